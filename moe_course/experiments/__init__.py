"""Named training experiments of notebooks 04-09: the runner, and one module of registered runs per notebook.

=====================  ======================================================================================
``runner``             ``Run``, ``Experiment``, ``register``, ``train_run``, fingerprinted results
                       (``load_result``, ``run_experiment``) and the command line
``balancing``          notebook 04: ``collapse``, ``aux_sweep``, ``aux_sweep_capacity``, ``z_loss``, ``routers``
``tuning``             ``@tuned``: an experiment and its ``NAME_tuning`` (every arm at the same learning rates)
``fine_grained``       notebook 05: ``fine_grained``
``loss_free``          notebook 06: ``loss_free_06``
``capstone``           notebook 08: ``capstone_tuning``, ``capstone``, ``recipe_bias_rate``, ``experts_sweep``
``serving``            notebook 09: ``serving_traces``
=====================  ======================================================================================

An experiment for a new notebook is one small module: copy ``fine_grained.py``, give ``@register`` a new name
and a ``build(size) -> list[Run]``, and import the module below. Then::

    python -m moe_course.experiments list
    python -m moe_course.experiments run NAME --size cpu --jobs 2
    python -m moe_course.experiments show NAME --size cpu

writes and reads ``data/results/NAME-SIZE.json``; a notebook reads it with ``load_result(NAME)``.
"""

from moe_course.experiments import balancing, capstone, fine_grained, loss_free, serving  # noqa: F401 (registers)
from moe_course.experiments.runner import (
    CODE_VERSION,
    CORPUS_NAME,
    EXPERIMENTS,
    RESULTS_DIR,
    SIZES,
    Experiment,
    ExperimentResult,
    Run,
    RunRecord,
    StaleResultError,
    fingerprint,
    format_summary,
    get_experiment,
    load_result,
    main,
    register,
    result_path,
    run_experiment,
    train_run,
)
from moe_course.loss_free import course_model as base_model
from moe_course.loss_free import course_train as base_train

__all__ = [
    "CODE_VERSION",
    "CORPUS_NAME",
    "EXPERIMENTS",
    "RESULTS_DIR",
    "SIZES",
    "Experiment",
    "ExperimentResult",
    "Run",
    "RunRecord",
    "StaleResultError",
    "base_model",
    "base_train",
    "fingerprint",
    "format_summary",
    "get_experiment",
    "load_result",
    "main",
    "register",
    "result_path",
    "run_experiment",
    "train_run",
]
