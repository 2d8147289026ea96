"""MoE from Scratch: the reference implementations behind the course notebooks.

Module map (one concept per module):

=====================  ==========================================================================
``device``             pick CUDA, then MPS, then CPU; seed everything; the environment report
``corpus``             the Python standard library as a byte-level text corpus, with token types
``synthetic``          small generated datasets for the early notebooks
``local_experts``      the 1991 mixture of local experts (Jacobs, Jordan, Nowlan & Hinton)
``experts``            expert FFNs (dense FFN, SwiGLU) and ``GroupedExperts`` (stacked weights, grouped GEMM)
``routing``            routers: top-k (softmax, sigmoid, noisy, group-limited), expert choice, hash
``dispatch``           sending tokens to experts and combining them; capacity and dropped tokens
``moe``                the MoE layer (router + experts + shared + dispatch + balancing) and the soft mixture
``balancing``          balancing losses and policies: Switch, z-loss, importance, sequence-wise, routing bias
``model``              a small decoder-only transformer LM with a pluggable feed-forward block
``train``              one training loop for notebooks and ``python -m moe_course.train``
``experiments``        named training sweeps stored as fingerprinted JSON (``python -m moe_course.experiments``)
``metrics``            expert load, MaxVio, coefficient of variation, routing entropy, MFU
``params``             total/active parameters and FLOPs of our models and of published ones
``plots``              the figures the notebooks draw
``widgets``            ipywidgets explorers that fall back to static plots
``plots_balancing``    notebook 04's figures, the collapse simulation and the balancing explorer
``fine_grained``       DeepSeekMoE configurations: fine-grained segmentation and shared experts (notebook 05)
``analysis``           looking inside trained MoEs: expert masking, similarity, token-type tables (notebook 05)
``plots_experts``      notebook 05's figures
``loss_free``          auxiliary-loss-free balancing: gradient interference, MaxVio, the 06 experiment
``plots_loss_free``    notebook 06's figures and the bias explorer
``parallel``           expert parallelism over torch.distributed: the layer and the process launcher (07)
``plots_parallel``     notebook 07's figures
``capstone``           notebook 08: equal-active twins, token-type x expert tables, routing of any text, explorer
``plots_capstone``     notebook 08's figures: curves over seeds, loss against the number of experts
``course_table``       the whole course in one table: each notebook's headline number and its paper
``check``              exercise checks: ``check.topk_router(my_router)`` and friends
``notebooks``          the pipeline that makes exercise notebooks from the solutions
``links``              the repository URL (``REPO_URL``) and the Colab / Binder links and badges
=====================  ==========================================================================
"""

from moe_course.device import environment_report, pick_device, seed_everything
from moe_course.links import REPO_URL, binder_badge, binder_url, colab_badge, colab_url

__version__ = "0.1.0"

__all__ = [
    "REPO_URL",
    "binder_badge",
    "binder_url",
    "colab_badge",
    "colab_url",
    "environment_report",
    "pick_device",
    "seed_everything",
    "__version__",
]
