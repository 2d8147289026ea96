"""MoE from Scratch: the reference implementations behind the course notebooks.

Module map (one concept per module):

=====================  ==========================================================================
``device``             pick CUDA, then MPS, then CPU; seed everything; the environment report
``corpus``             the Python standard library as a byte-level text corpus, with token types
``synthetic``          small generated datasets for the early notebooks
``local_experts``      the 1991 mixture of local experts (Jacobs, Jordan, Nowlan & Hinton)
``experts``            expert feed-forward networks (dense FFN, SwiGLU) and banks of experts
``routing``            routers: softmax top-k, sigmoid scores, noisy top-k gating
``dispatch``           sending tokens to experts and combining them; capacity and dropped tokens
``moe``                the MoE layer (router + experts + dispatch) and the soft mixture
``model``              a small decoder-only transformer LM with a pluggable feed-forward block
``train``              one training loop for notebooks and ``python -m moe_course.train``
``experiments``        named training sweeps stored as fingerprinted JSON (``python -m moe_course.experiments``)
``metrics``            expert load, MaxVio, coefficient of variation, routing entropy
``params``             total/active parameters and FLOPs of our models and of published ones
``plots``              the figures the notebooks draw
``widgets``            ipywidgets explorers that fall back to static plots
``plots_balancing``    notebook 04's figures, the collapse simulation and the balancing explorer
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
