"""MoE from Scratch: the reference implementations behind every notebook of the course.

The top level holds the concepts the notebooks teach, one per module; three subpackages hold the rest:
``plots`` (each notebook's figures and explorers), ``experiments`` (the runner and each notebook's stored
training sweeps) and ``course`` (the machinery that builds the course: notebook pipeline, generated tables,
links). Concepts never import the subpackages; figures import concepts only (tests/test_imports.py).

=====================  ==========================================================================
Concepts               (the notebook that teaches each)
``device``             pick CUDA, then MPS, then CPU; seed everything; the environment report (all)
``params``             total/active parameters and FLOPs of our models and of published ones (00)
``synthetic``          small generated datasets with regimes (01)
``local_experts``      the 1991 mixture of local experts (Jacobs, Jordan, Nowlan & Hinton) (01)
``experts``            expert FFNs (dense FFN, SwiGLU) and ``GroupedExperts`` (stacked weights, grouped GEMM) (02)
``moe``                the MoE layer (router + experts + shared + dispatch + balancing) and the soft mixture (02)
``model``              a small decoder-only transformer LM with a pluggable feed-forward block (02)
``train``              one training loop for notebooks and ``python -m moe_course.train`` (02)
``timing``             wall-clock timing: warm up, repeat, median (02, 03)
``routing``            routers: top-k (softmax, sigmoid, noisy, group-limited), expert choice, hash (03)
``dispatch``           sending tokens to experts and combining them; capacity and dropped tokens (03)
``metrics``            expert load, MaxVio, CV, routing entropy, MFU, paired seed comparisons (00)
``corpus``             the Python standard library as a byte-level text corpus, with token types (04)
``snapshot``           the frozen corpus files under data/corpus/ (read by ``corpus``)
``balancing``          balancing losses and policies: Switch, z-loss, importance, sequence-wise, routing bias (04)
``fine_grained``       DeepSeekMoE configurations: fine-grained segmentation and shared experts (05)
``analysis``           looking inside trained MoEs: expert masking, similarity, token-type tables (05)
``loss_free``          auxiliary-loss-free balancing: gradient interference, MaxVio, the course's sizes (06)
``parallel``           expert parallelism over torch.distributed: the layer and the process launcher (07)
``collectives``        a notebook function run on W processes; the token exchange (07)
``capstone``           equal-active twins, token-type x expert tables, routing of any text (08)
``serving``            weight and KV bytes per token, batching, decode timing (09)
``offload``            expert caches under a memory budget: LRU, Belady, static, prefetch (09)
``validate``           the argument checks every module shares
``check``              exercise checks: ``check.topk_router(my_router)`` and friends
Subpackages
``plots``              figures and explorers: ``plots.<concept>`` draws notebook NN's concept
``experiments``        named training sweeps stored as fingerprinted JSON (``python -m moe_course.experiments``)
``course``             notebook pipeline, README/RESULTS tables, course table, links (for maintainers)
=====================  ==========================================================================
"""

from moe_course.device import environment_report, pick_device, pin_threads, seed_everything

__version__ = "0.1.0"

__all__ = [
    "environment_report",
    "pick_device",
    "pin_threads",
    "seed_everything",
    "__version__",
]
