"""Every notebook's figures and explorers: ``plots.<concept>`` draws what ``moe_course.<concept>`` computes.

Every function returns its ``Figure`` (or an ipywidgets explorer with a static fallback) and takes an optional
``ax``; the shared look is in ``style``. Figures import the concept modules, never the other way round.

=====================  ==========================================================================
``style``              the colour cycle, ``figure_axes`` and ``style_axes``: one look for every figure
``params``             where parameters live, total vs active of published MoEs, cost against N (00, 02)
``moe``                the MoE block diagram, router scores with chosen experts, loss and load curves (00-03)
``local_experts``      notebook 01: the data's regimes, the gate's partition, each expert's fit
``widgets``            notebook 03: the capacity explorer (sliders, kept and dropped tokens)
``balancing``          notebook 04: the collapse simulation, alpha sweeps, z-loss and router figures
``fine_grained``       notebook 05: expert layouts, combinations, the trained comparison, heatmaps
``loss_free``          notebook 06: MaxVio and loss series, the trade-off, the bias explorer
``parallel``           notebook 07: dispatch/compute/combine, all-to-all traffic, phase times
``capstone``           notebook 08: curves over seeds, the tuning grid, the expert sweep, routed text
``serving``            notebook 09: hit rates, decode split, the offloading explorer
=====================  ==========================================================================
"""
