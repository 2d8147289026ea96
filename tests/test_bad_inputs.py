"""Bad inputs raise a named error at the call's entry, never deep inside torch or numpy, and never pass silently.

One row per bad input: the call, the exception type, and the argument its message must name. Each error must
also come from the package's own code (the innermost frame of the traceback is a ``moe_course`` file), so a
failure deep inside torch that happens to mention the word does not count. The last tests check that valid
inputs next to the bad ones still work.
"""

from __future__ import annotations

import functools
import math
import socket
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from moe_course import (
    analysis,
    balancing,
    capstone,
    collectives,
    corpus,
    dispatch,
    experiments,
    fine_grained,
    local_experts,
    loss_free,
    metrics,
    offload,
    parallel,
    params,
    routing,
    serving,
    snapshot,
)
from moe_course.course import links
from moe_course.experiments import capstone as capstone_runs
from moe_course.experiments import runner as experiment_runner
from moe_course.model import ModelConfig, TinyLM
from moe_course.moe import MoE
from moe_course.plots import capstone as capstone_plots
from moe_course.train import TrainConfig

PACKAGE = Path(routing.__file__).resolve().parent
T = torch.tensor


# ---------------------------------------------------------------------------------------------------------
# small, cached objects the rows share (built on first use, so collecting the tests stays fast)


@functools.cache
def _exp_loss_free():
    from moe_course.experiments import loss_free as exp

    return exp


def _exp_fine_grained():
    from moe_course.experiments import fine_grained as exp

    return exp


def tiny_model(**overrides) -> TinyLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, block_size=8, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2,
               expert_hidden=8, d_hidden=16)
    return TinyLM(ModelConfig(**{**cfg, **overrides}))


@functools.cache
def dense_model() -> TinyLM:
    return tiny_model(ffn="dense")


@functools.cache
def data() -> torch.Tensor:
    return torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))


@functools.cache
def types() -> torch.Tensor:
    return torch.randint(0, 9, (200,), generator=torch.Generator().manual_seed(1))


@functools.cache
def routed() -> capstone.RoutedText:
    return capstone.route_text(tiny_model(), "def f(x):\n    return x + 1\n")


def a_result(name: str = "z_loss") -> experiments.ExperimentResult:
    runs = experiments.get_experiment(name).runs("smoke")
    return experiments.ExperimentResult(name, "smoke", [0], "", experiment_runner._configs(runs),
                                        [experiments.RunRecord(r.label, 0, val_loss=[2.0]) for r in runs])


def one_rank_group(fn):
    """Run ``fn()`` inside a process group of one rank (gloo), as ``launch`` would on each rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


def hash_forward(token_ids: torch.Tensor):
    router = routing.HashRouter(4, vocab_size=10, k=2)
    return router(torch.zeros(token_ids.numel(), 8), token_ids)


def with_mask(m):
    with analysis.mask_top_experts(tiny_model(), m):
        pass


DEMO = {"d_model": 8, "d_hidden": 16, "n_experts": 4, "top_k": 2}
SMOKE_RUN = experiments.Run("x", experiments.base_model("smoke"), experiments.base_train("smoke"))
TRAIN_CFG = TrainConfig(steps=4, batch_size=2, eval_every=2, eval_batches=1, warmup=1)


# ---------------------------------------------------------------------------------------------------------
# the bad inputs: (id, call, exception type, argument the message names)

ROWS = [
    # routing.py: shapes of scores and bias, k, groups, capacity factors, token ids
    ("select_topk-scores-1d", lambda: routing.select_topk(torch.rand(4), 2), ValueError, "scores"),
    ("select_topk-scores-3d", lambda: routing.select_topk(torch.rand(2, 3, 4), 2), ValueError, "scores"),
    ("select_topk-bias-length", lambda: routing.select_topk(torch.rand(3, 4), 2, bias=torch.zeros(5)), ValueError,
     "bias"),
    ("select_topk-bias-length-1", lambda: routing.select_topk(torch.rand(3, 4), 2, bias=torch.zeros(1)), ValueError,
     "bias"),
    ("select_topk-bias-rows", lambda: routing.select_topk(torch.rand(3, 4), 2, bias=torch.zeros(2, 4)), ValueError,
     "bias"),
    ("select_topk-n_groups-0", lambda: routing.select_topk(torch.rand(3, 4), 2, n_groups=0), ValueError, "n_groups"),
    ("select_topk-topk_groups>n_groups", lambda: routing.select_topk(torch.rand(3, 4), 2, topk_groups=2), ValueError,
     "topk_groups"),
    ("select_topk-k>kept-experts", lambda: routing.select_topk(torch.rand(3, 8), 3, n_groups=4, topk_groups=1),
     ValueError, "k=3"),
    ("softmax_topk-logits-1d", lambda: routing.softmax_topk(torch.randn(4), 2), ValueError, "logits"),
    ("softmax_topk-bias-length", lambda: routing.softmax_topk(torch.randn(3, 4), 2, bias=torch.zeros(3)), ValueError,
     "bias"),
    ("sigmoid_topk-logits-3d", lambda: routing.sigmoid_topk(torch.randn(2, 3, 4), 2), ValueError, "logits"),
    ("sigmoid_topk-k>kept-experts", lambda: routing.sigmoid_topk(torch.randn(3, 8), 4, n_groups=4, topk_groups=1),
     ValueError, "topk_groups"),
    ("sigmoid_topk-n_groups-not-dividing", lambda: routing.sigmoid_topk(torch.randn(3, 6), 2, n_groups=4),
     ValueError, "n_groups"),
    ("group_limited_mask-n_groups-0", lambda: routing.group_limited_mask(torch.rand(3, 4), 0, 1, False), ValueError,
     "n_groups"),
    ("group_limited_mask-choice-1d", lambda: routing.group_limited_mask(torch.rand(4), 2, 1, False), ValueError,
     "choice"),
    ("keep_topk_softmax-h-1d", lambda: routing.keep_topk_softmax(torch.randn(4), 2), ValueError, "h must"),
    ("noisy_topk_logits-noise-shape", lambda: routing.noisy_topk_logits(torch.zeros(4, 3), torch.zeros(4, 5)),
     ValueError, "noise_logits"),
    ("noisy_topk_logits-noise-broadcasts-up", lambda: routing.noisy_topk_logits(torch.zeros(4, 3),
                                                                                torch.zeros(2, 4, 3)),
     ValueError, "noise_logits"),
    ("expert_choice-scores-1d", lambda: routing.expert_choice(torch.rand(6), 2), ValueError, "scores"),
    ("expert_choice_capacity-cf-0", lambda: routing.expert_choice_capacity(16, 4, 0.0), ValueError,
     "capacity_factor"),
    ("expert_choice_capacity-cf-negative", lambda: routing.expert_choice_capacity(16, 4, -1.0), ValueError,
     "capacity_factor"),
    ("expert_choice_capacity-n_experts-0", lambda: routing.expert_choice_capacity(16, 0, 1.0), ValueError,
     "n_experts"),
    ("expert_choice_capacity-n_tokens-0", lambda: routing.expert_choice_capacity(0, 4, 1.0), ValueError, "n_tokens"),
    ("TopKRouter-d_model-0", lambda: routing.TopKRouter(0, 4, 2), ValueError, "d_model"),
    ("TopKRouter-n_experts-0", lambda: routing.TopKRouter(8, 0, 1), ValueError, "n_experts"),
    ("TopKRouter-n_groups-float", lambda: routing.TopKRouter(8, 8, 2, score="sigmoid", n_groups=2.0), TypeError,
     "n_groups"),
    ("ExpertChoiceRouter-cf-str", lambda: routing.ExpertChoiceRouter(8, 4, "2"), TypeError, "capacity_factor"),
    ("HashRouter-vocab_size-float", lambda: routing.HashRouter(4, 256.0), TypeError, "vocab_size"),
    ("HashRouter-token-id>=vocab", lambda: hash_forward(T([1, 10])), ValueError, "token_ids"),
    ("HashRouter-token-id-negative", lambda: hash_forward(T([1, -1])), ValueError, "token_ids"),
    ("HashRouter-token-ids-float", lambda: hash_forward(T([1.0, 2.0])), TypeError, "token_ids"),
    # balancing.py: shapes, expert ids, counts, rates
    ("switch_aux_loss-indices-1d", lambda: balancing.switch_aux_loss(torch.rand(4, 4), T([0, 1, 2, 3]), 4),
     ValueError, "indices"),
    ("switch_aux_loss-scores-1d", lambda: balancing.switch_aux_loss(torch.rand(4), T([[0], [1], [2], [3]]), 4),
     ValueError, "scores"),
    ("switch_aux_loss-scores-N", lambda: balancing.switch_aux_loss(torch.rand(4, 5), T([[0], [1], [2], [3]]), 4),
     ValueError, "n_experts"),
    ("switch_aux_loss-T-mismatch", lambda: balancing.switch_aux_loss(torch.rand(4, 4), T([[0], [1], [2]]), 4),
     ValueError, "indices"),
    ("switch_aux_loss-id>=N", lambda: balancing.switch_aux_loss(torch.rand(2, 4), T([[0], [4]]), 4), ValueError,
     "indices"),
    ("switch_aux_loss-id-negative", lambda: balancing.switch_aux_loss(torch.rand(2, 4), T([[0], [-1]]), 4),
     ValueError, "indices"),
    ("switch_aux_loss-n_experts-0", lambda: balancing.switch_aux_loss(torch.rand(2, 0), T([[0], [0]]), 0),
     ValueError, "n_experts"),
    ("router_z_loss-logits-1d", lambda: balancing.router_z_loss(torch.randn(4)), ValueError, "logits"),
    ("importance_loss-scores-1d", lambda: balancing.importance_loss(torch.rand(4)), ValueError, "scores"),
    ("sequence_aux_loss-2d", lambda: balancing.sequence_aux_loss(torch.rand(4, 4), T([[0], [1], [2], [3]]), 4),
     ValueError, "scores"),
    ("sequence_aux_loss-S-mismatch", lambda: balancing.sequence_aux_loss(torch.rand(2, 4, 4),
                                                                         torch.zeros(2, 3, 2, dtype=torch.long), 4),
     ValueError, "indices"),
    ("sequence_aux_loss-scores-N", lambda: balancing.sequence_aux_loss(torch.rand(1, 4, 5),
                                                                       torch.zeros(1, 4, 2, dtype=torch.long), 4),
     ValueError, "n_experts"),
    ("bias_update-counts-length", lambda: balancing.bias_update(torch.zeros(4), T([1, 2, 3]), 1e-3), ValueError,
     "counts"),
    ("bias_update-counts-length-1", lambda: balancing.bias_update(torch.zeros(4), T([5]), 1e-3), ValueError,
     "counts"),
    ("bias_update-counts-negative", lambda: balancing.bias_update(torch.zeros(3), T([4, -1, 2]), 1e-3), ValueError,
     "counts"),
    ("bias_update-counts-fractional", lambda: balancing.bias_update(torch.zeros(3), T([1.5, 2.0, 0.5]), 1e-3),
     ValueError, "counts"),
    ("bias_update-rate-negative", lambda: balancing.bias_update(torch.zeros(3), T([1, 2, 3]), -1e-3), ValueError,
     "rate"),
    ("bias_update-rate-nan", lambda: balancing.bias_update(torch.zeros(3), T([1, 2, 3]), math.nan), ValueError,
     "rate"),
    ("SwitchAuxLoss-n_experts-0", lambda: balancing.SwitchAuxLoss(0.01, 0), ValueError, "n_experts"),
    ("SequenceAuxLoss-n_experts-float", lambda: balancing.SequenceAuxLoss(1e-4, 4.0), TypeError, "n_experts"),
    # parallel.py: ranks, world, expert ids, byte sizes, per-rank settings
    ("experts_per_rank-n_experts-0", lambda: parallel.experts_per_rank(0, 2), ValueError, "n_experts"),
    ("experts_per_rank-n_experts-negative", lambda: parallel.experts_per_rank(-4, 2), ValueError, "n_experts"),
    ("experts_per_rank-world-0", lambda: parallel.experts_per_rank(8, 0), ValueError, "world"),
    ("local_experts-rank-float", lambda: parallel.local_experts(1.5, 2, 8), TypeError, "rank"),
    ("local_experts-rank-outside", lambda: parallel.local_experts(2, 2, 8), ValueError, "rank"),
    ("expert_owner-id>=N", lambda: parallel.expert_owner(T([0, 8]), 8, 2), ValueError, "n_experts"),
    ("send_counts-id>=N", lambda: parallel.send_counts(T([[0, 9]]), 8, 2), ValueError, "n_experts"),
    ("send_counts-id-negative", lambda: parallel.send_counts(T([[0, -1]]), 8, 2), ValueError, "n_experts"),
    ("send_counts-ids-float", lambda: parallel.send_counts(T([[0.0, 5.0]]), 8, 2), TypeError, "indices"),
    ("rank_order-id>=N", lambda: parallel.rank_order(T([[0, 8]]), 8, 2), ValueError, "n_experts"),
    ("ranks_per_token-1d", lambda: parallel.ranks_per_token(T([0, 5]), 8, 2), ValueError, "indices"),
    ("ranks_per_token-id>=N", lambda: parallel.ranks_per_token(T([[0, 8]]), 8, 2), ValueError, "n_experts"),
    ("dispatch_bytes-rank=world", lambda: parallel.dispatch_bytes(T([[0, 5]]), 8, 2, 2, 8, 4), ValueError, "rank"),
    ("dispatch_bytes-rank-negative", lambda: parallel.dispatch_bytes(T([[0, 5]]), 8, 2, -1, 8, 4), ValueError,
     "rank"),
    ("dispatch_bytes-d_model-0", lambda: parallel.dispatch_bytes(T([[0, 5]]), 8, 2, 0, 0, 4), ValueError, "d_model"),
    ("dispatch_bytes-bytes-negative", lambda: parallel.dispatch_bytes(T([[0, 5]]), 8, 2, 0, 8, -2), ValueError,
     "bytes_per_element"),
    ("launch-threads-0", lambda: parallel.launch(parallel.fail_on_rank, 2, 0, "raise", threads=0), ValueError,
     "threads"),
    ("launch-fn-not-callable", lambda: parallel.launch("fail_on_rank", 2), TypeError, "fn"),
    ("ExpertParallelMoE-not-a-MoE", lambda: parallel.ExpertParallelMoE(torch.nn.Linear(4, 4), 0, 2), TypeError,
     "moe"),
    ("profile_layer-bias-length", lambda: parallel.profile_layer(DEMO, 16, bias=[0.1, 0.0]), ValueError, "bias"),
    ("profile_layer-bias-length-1", lambda: parallel.profile_layer(DEMO, 16, bias=[0.1]), ValueError, "bias"),
    ("profile_layer-repeats-0", lambda: parallel.profile_layer(DEMO, 16, repeats=0), ValueError, "repeats"),
    ("profile_layer-dtype", lambda: parallel.profile_layer(DEMO, 16, dtype="float8"), ValueError, "dtype"),
    ("balance_with_bias-bias-length", lambda: parallel.balance_with_bias(DEMO, 16, [0.1, 0.0, 0.0], 2), ValueError,
     "bias"),
    ("compare-tokens-per-rank", lambda: one_rank_group(
        lambda: parallel.compare_with_single_process([{"moe": DEMO, "tokens": [4, 4]}])), ValueError, "tokens"),
    ("compare-tokens-negative", lambda: one_rank_group(
        lambda: parallel.compare_with_single_process([{"moe": DEMO, "tokens": [-4]}])), ValueError, "tokens"),
    # analysis.py: masks, tables of counts, paired data and types, batch counts
    ("mask_top_experts-m-negative", lambda: with_mask(-1), ValueError, "m must"),
    ("mask_top_experts-m-float", lambda: with_mask(1.5), TypeError, "m must"),
    ("mask_top_experts-m>N-k", lambda: with_mask(3), ValueError, "m=3"),
    ("redundancy-masks-negative", lambda: analysis.redundancy(tiny_model(), data(), masks=(-1,)),
     ValueError, "masks"),
    ("redundancy-batch_size-0", lambda: analysis.redundancy(tiny_model(), data(), batch_size=0), ValueError,
     "batch_size"),
    ("shared_as_routed-no-shared", lambda: analysis.shared_as_routed(tiny_model()).__enter__(), ValueError,
     "shared experts"),
    ("routing_tables-types-shorter", lambda: analysis.routing_tables(tiny_model(), data(), types()[:50], 9),
     ValueError, "types"),
    ("routing_tables-n_batches-0", lambda: analysis.routing_tables(tiny_model(), data(), types(), 9, n_batches=0),
     ValueError, "n_batches"),
    ("routing_tables-data-too-short", lambda: analysis.routing_tables(tiny_model(), data()[:8], types()[:8], 9),
     ValueError, "data"),
    ("mutual_information-1d", lambda: analysis.mutual_information(T([1, 2, 3])), ValueError, "table"),
    ("byte_routing_tables-n_batches-0", lambda: analysis.byte_routing_tables(tiny_model(), data(), types(), 9,
                                                                             n_batches=0), ValueError, "n_batches"),
    ("conditional_mutual_information-2d", lambda: analysis.conditional_mutual_information(T([[1, 2], [3, 4]])),
     ValueError, "3-D"),
    ("byte_lookup_table-empty", lambda: analysis.byte_lookup_table(torch.zeros(256, 2, 3, dtype=torch.long)),
     ValueError, "empty"),
    ("shuffled_within_bytes-negative", lambda: analysis.shuffled_within_bytes(-torch.ones(256, 2, 3, dtype=torch.long)),
     ValueError, ">= 0"),
    ("specialisation_by_byte-no-tables", lambda: analysis.specialisation_by_byte([]), ValueError, "tables is empty"),
    ("mutual_information-negative", lambda: analysis.mutual_information(T([[3, -1], [2, 4]])), ValueError, "table"),
    ("mutual_information-empty", lambda: analysis.mutual_information(torch.zeros(2, 3)), ValueError, "table"),
    ("random_router_table-float", lambda: analysis.random_router_table(T([[1.0, 2.0], [3.0, 4.0]])), TypeError,
     "table"),
    ("random_router_table-negative", lambda: analysis.random_router_table(T([[1, -2], [3, 4]])), ValueError, "table"),
    ("specialisation-one-type", lambda: analysis.specialisation([T([[3, 4], [0, 0]])]), ValueError, "tables[0]"),
    ("type_expert_table-indices-float", lambda: analysis.type_expert_table(T([0, 1]), T([[0.7], [1.2]]), 2, 2),
     TypeError, "indices"),
    ("type_expert_table-n_types-0", lambda: analysis.type_expert_table(T([], dtype=torch.long),
                                                                       torch.zeros(0, 1, dtype=torch.long), 0, 2),
     ValueError, "n_types"),
    ("expert_output_similarity-1-expert", lambda: analysis.expert_output_similarity(
        tiny_model(n_experts=1, top_k=1), data(), 16), ValueError, "n_experts"),
    ("expert_output_similarity-n_tokens-0", lambda: analysis.expert_output_similarity(tiny_model(), data(), 0),
     ValueError, "n_tokens"),
    ("probe-n_batches-1", lambda: analysis.probe(tiny_model(), SimpleNamespace(val=data(), val_types=types()),
                                                 n_batches=1), ValueError, "n_batches"),
    # capstone.py: text, rendering arguments, configs
    ("route_text-text-int", lambda: capstone.route_text(tiny_model(), 5), TypeError, "text must"),
    ("route_text-text-None", lambda: capstone.route_text(tiny_model(), None), TypeError, "text must"),
    ("route_text-model", lambda: capstone.route_text(torch.nn.Linear(2, 2), "x"), TypeError, "model"),
    ("plot_routed_text-layer-bool", lambda: capstone_plots.plot_routed_text(routed(), layer=True), ValueError, "layer"),
    ("plot_routed_text-routed", lambda: capstone_plots.plot_routed_text({"bytes": []}), TypeError, "routed"),
    ("expert_colors-0", lambda: capstone_plots.expert_colors(0), ValueError, "n_experts"),
    ("expert_colors-negative", lambda: capstone_plots.expert_colors(-3), ValueError, "n_experts"),
    ("train_flops_per_token_of-cfg", lambda: capstone.train_flops_per_token_of({"d_model": 8}), TypeError, "cfg"),
    ("routing_explorer-text-bytes", lambda: capstone_plots.routing_explorer(tiny_model(), b"x = 1"), TypeError, "text"),
    # experiments/
    ("fingerprint-size", lambda: experiments.fingerprint("z_loss", "huge"), ValueError, "size"),
    ("train_run-seed-negative", lambda: experiments.train_run(SMOKE_RUN, -1, None, "smoke"), ValueError, "seed"),
    ("train_run-size", lambda: experiments.train_run(SMOKE_RUN, 0, None, "huge"), ValueError, "size"),
    ("train_run-run", lambda: experiments.train_run("x", 0, None, "smoke"), TypeError, "run"),
    ("run_experiment-jobs-float", lambda: experiments.run_experiment("z_loss", "smoke", [0], "cpu", False, False,
                                                                     jobs=1.5), TypeError, "jobs"),
    ("run_experiment-jobs-bool", lambda: experiments.run_experiment("z_loss", "smoke", [0], "cpu", False, False,
                                                                    jobs=True), TypeError, "jobs"),
    ("ExperimentResult.mean-key", lambda: a_result().mean("z=0", "val_los"), ValueError, "key"),
    ("tuning_choice-result", lambda: capstone_runs.tuning_choice(a_result()), ValueError, "result"),
    ("load_result-name", lambda: experiments.load_result("nope", "cpu"), ValueError, "experiment"),
    ("register-seeds-empty", lambda: experiments.register("x", "x", seeds=()), ValueError, "seeds"),
    ("register-version-0", lambda: experiments.register("x", "x", version=0), ValueError, "version"),
    # loss_free.py
    ("router_gradients-x-1d", lambda: loss_free.router_gradients(tiny_model(), T([1, 2, 3]), T([2, 3, 4])),
     ValueError, "x must"),
    ("router_gradients-xy-shapes", lambda: loss_free.router_gradients(tiny_model(), torch.zeros(2, 4).long(),
                                                                      torch.zeros(2, 3).long()), ValueError, "x and y"),
    ("global_counts-n_batches-0", lambda: loss_free.global_counts(tiny_model(), data(), 2, 0), ValueError,
     "n_batches"),
    ("max_vio_global-dense", lambda: loss_free.max_vio_global(dense_model(), data(), 2, 1), ValueError, "model"),
    ("LossFreeRecorder-log_every-0", lambda: loss_free.LossFreeRecorder(0, TRAIN_CFG, data()), ValueError,
     "log_every"),
    ("simulate_bias-k-float", lambda: loss_free.simulate_bias(k=1.5, steps=2), TypeError, "k must"),
    ("simulate_bias-rate-str", lambda: loss_free.simulate_bias(rate="1e-3", steps=2), TypeError, "rate"),
    ("simulate_bias-skew-nan", lambda: loss_free.simulate_bias(skew=math.nan, steps=2), ValueError, "skew"),
    ("simulate_bias-steps-float", lambda: loss_free.simulate_bias(steps=2.5), TypeError, "steps"),
    ("track-size", lambda: loss_free.track(SimpleNamespace(val=data()), TRAIN_CFG, 2, "huge", None), ValueError,
     "size"),
    ("stats-key", lambda: loss_free.stats(a_result(), "z=0", "val_los"), ValueError, "key"),
    ("bias_flips-dense", lambda: loss_free.bias_flips(dense_model(), data(), 2, 1), ValueError, "routing bias"),
    ("bias_flips-batch_size-0", lambda: loss_free.bias_flips(tiny_model(), data(), 0, 1), ValueError, "batch_size"),
    ("balanced_choice-prefix", lambda: _exp_loss_free().balanced_choice(a_result(), "aux", 0.3), ValueError,
     "prefix must"),
    ("balanced_choice-target", lambda: _exp_loss_free().balanced_choice(a_result(), "aux alpha=", -1), ValueError,
     "target must"),
    ("tuned_regime-layout", lambda: _exp_fine_grained().tuned_regime(a_result(), "GShard"), ValueError,
     "layout must"),
    # model.py: ModelConfig settings that used to fail only when TinyLM was built or run (or never)
    ("ModelConfig-expert_hidden-0", lambda: ModelConfig(expert_hidden=0), ValueError, "expert_hidden"),
    ("ModelConfig-router-not-str", lambda: ModelConfig(router=5), TypeError, "router"),
    ("ModelConfig-router_score-unknown", lambda: ModelConfig(router_score="relu"), ValueError, "router_score"),
    ("ModelConfig-router_score-with-hash", lambda: ModelConfig(router="hash", router_score="sigmoid",
                                                               aux_loss_coef=0.0), ValueError, "router_score"),
    ("ModelConfig-moe_every>n_layer", lambda: ModelConfig(n_layer=4, moe_every=5), ValueError, "moe_every"),
    ("ModelConfig-n_groups-not-dividing", lambda: ModelConfig(n_groups=3, router_score="sigmoid"), ValueError,
     "n_groups"),
    ("ModelConfig-n_groups-0", lambda: ModelConfig(n_groups=0), ValueError, "n_groups"),
    ("ModelConfig-topk_groups>n_groups", lambda: ModelConfig(n_groups=2, topk_groups=3, router_score="sigmoid"),
     ValueError, "topk_groups"),
    ("ModelConfig-topk_groups-without-groups", lambda: ModelConfig(topk_groups=2), ValueError, "topk_groups"),
    ("ModelConfig-n_groups-softmax", lambda: ModelConfig(n_groups=2), ValueError, "router_score"),
    ("ModelConfig-top_k>kept-experts", lambda: ModelConfig(n_groups=4, topk_groups=1, top_k=3,
                                                           router_score="sigmoid"), ValueError, "top_k"),
    ("ModelConfig-n_groups-with-hash", lambda: ModelConfig(router="hash", n_groups=2, aux_loss_coef=0.0), ValueError,
     "n_groups"),
    ("ModelConfig-dropout-str", lambda: ModelConfig(dropout="0.1"), TypeError, "dropout"),
    ("ModelConfig-d_model-by-n_head", lambda: ModelConfig(d_model=30, n_head=4), ValueError, "n_head"),
    ("ModelConfig-top_k>n_experts", lambda: ModelConfig(n_experts=4, top_k=5), ValueError, "top_k"),
    ("ModelConfig-block_size-0", lambda: ModelConfig(block_size=0), ValueError, "block_size"),
]


def moe_layer() -> MoE:
    torch.manual_seed(0)
    return MoE(8, 16, 4, 2)


def experts4() -> list[torch.nn.Module]:
    return [torch.nn.Linear(8, 8) for _ in range(4)]


def foreign_file(tmp: str = "foreign.xz") -> Path:
    """A file that is not a snapshot (valid xz of other bytes), under a fresh temporary folder."""
    import lzma
    import tempfile
    path = Path(tempfile.mkdtemp()) / tmp
    path.write_bytes(lzma.compress(b"MOE-COURSE-CORPUS\n{not json\n"))
    return path


def decode_with(model: TinyLM, **kw):
    return serving.time_decode({"m": model}, **{"batch_sizes": [1], "prompt_len": 2, "new_tokens": 2, "repeats": 1,
                                                "split": False, **kw})


TRACE = T([[0, 1], [2, 3], [0, 2]])
TRACES = T([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
X8 = torch.randn(3, 8)

# issue 26: the areas a hold-out set of bad calls found failing deep inside torch, numpy or the standard library,
# or passing silently
ROWS += [
    # serving.py
    ("expected_distinct-batch-str", lambda: serving.expected_distinct_experts(8, 2, "4"), TypeError, "batch"),
    ("expected_distinct-batch-nan", lambda: serving.expected_distinct_experts(8, 2, math.nan), ValueError, "batch"),
    ("expected_distinct-k-float", lambda: serving.expected_distinct_experts(8, 2.0, 4), TypeError, "k must"),
    ("distinct_from_share-batch-str", lambda: serving.distinct_from_share([0.5, 0.5], "2"), TypeError, "batch"),
    ("distinct_from_share-batch-negative", lambda: serving.distinct_from_share([0.5, 0.5], -1), ValueError, "batch"),
    ("distinct_from_share-share-nan", lambda: serving.distinct_from_share([math.nan, 0.5], 2), ValueError, "share"),
    ("token_share-id-negative", lambda: serving.token_share(T([[0, -1]]), 4), ValueError, "trace"),
    ("token_share-id>=N", lambda: serving.token_share(T([[0, 4]]), 4), ValueError, "trace"),
    ("token_share-n_experts-0", lambda: serving.token_share(T([[0, 1]]), 0), ValueError, "n_experts"),
    ("token_share-float", lambda: serving.token_share(T([[0.5, 1.0]]), 4), TypeError, "trace"),
    ("measured_distinct-id>=N", lambda: serving.measured_distinct_experts(TRACES, [1], 3), ValueError, "trace"),
    ("measured_distinct-id-negative", lambda: serving.measured_distinct_experts(-TRACES - 1, [1], 4), ValueError,
     "trace"),
    ("measured_distinct-batch-0", lambda: serving.measured_distinct_experts(TRACES, [0], 4), ValueError, "batch"),
    ("measured_distinct-n_experts-str", lambda: serving.measured_distinct_experts(TRACES, [1], "4"), TypeError,
     "n_experts"),
    ("bytes_per_token-tensor-not-list", lambda: serving.bytes_per_token(T([[0, 1], [2, 3]]), 1.0, 1.0), TypeError,
     "indices"),
    ("bytes_per_token-1d-layer", lambda: serving.bytes_per_token([T([0, 1])], 1.0, 1.0), ValueError, "indices"),
    ("bytes_per_token-expert_bytes-negative", lambda: serving.bytes_per_token([T([[0, 1]])], -1.0, 1.0), ValueError,
     "expert_bytes"),
    ("bytes_per_token-other_bytes-str", lambda: serving.bytes_per_token([T([[0, 1]])], 1.0, "1"), TypeError,
     "other_bytes"),
    ("model_weight_bytes-negative", lambda: serving.model_weight_bytes(tiny_model(), -2.0), ValueError,
     "bytes_per_param"),
    ("model_weight_bytes-model", lambda: serving.model_weight_bytes(torch.nn.Linear(2, 2)), TypeError, "model"),
    ("roofline-batch-0", lambda: serving.moe_layer_roofline(0, 8, 2, 100), ValueError, "batch"),
    ("roofline-batch-str", lambda: serving.moe_layer_roofline("4", 8, 2, 100), TypeError, "batch"),
    ("roofline-expert_params-negative", lambda: serving.moe_layer_roofline(4, 8, 2, -100), ValueError,
     "expert_params"),
    ("roofline-bytes-0", lambda: serving.moe_layer_roofline(4, 8, 2, 100, 0.0), ValueError, "bytes_per_param"),
    ("busiest_gpu-id-out-of-range", lambda: serving.busiest_gpu([[0, 1], [2, 5]], [1.0] * 4), ValueError,
     "expert id in gpus"),
    ("busiest_gpu-load-scalar", lambda: serving.busiest_gpu([[0]], 1.0), ValueError, "load must"),
    ("busiest_gpu-load-negative", lambda: serving.busiest_gpu([[0], [1]], [1.0, -1.0]), ValueError, "load must"),
    ("busiest_gpu-gpus-flat", lambda: serving.busiest_gpu([0, 1], [1.0, 1.0]), TypeError, "gpus must"),
    ("placement_load-n_gpus-0", lambda: serving.placement_load([0.25] * 4, 0), ValueError, "n_gpus"),
    ("placement_load-n_gpus-float", lambda: serving.placement_load([0.25] * 4, 2.0), TypeError, "n_gpus"),
    ("placement_load-redundant-negative", lambda: serving.placement_load([0.25] * 4, 2, -2), ValueError,
     "redundant"),
    ("placement_load-share-negative", lambda: serving.placement_load([0.5, -0.5, 0.5, 0.5], 2), ValueError, "share"),
    ("pcie-lanes-0", lambda: serving.pcie_bytes_per_s(4, 0), ValueError, "lanes"),
    ("pcie-generation-bool", lambda: serving.pcie_bytes_per_s(True), TypeError, "generation"),
    ("serving_row-cfg", lambda: serving.serving_row({"name": "x"}), TypeError, "cfg"),
    ("serving_row-batch-0", lambda: serving.serving_row(params.get_published("mixtral-8x7b"), batch_sizes=[0]),
     ValueError, "batch_sizes"),
    ("time_decode-no-models", lambda: serving.time_decode({}, [1]), ValueError, "models"),
    ("time_decode-repeats-0", lambda: decode_with(tiny_model(), repeats=0), ValueError, "repeats"),
    ("time_decode-new_tokens-0", lambda: decode_with(tiny_model(), new_tokens=0), ValueError, "new_tokens"),
    ("time_decode-batch-0", lambda: decode_with(tiny_model(), batch_sizes=[0]), ValueError, "batch_sizes"),
    ("time_decode-prompt_len-0", lambda: decode_with(tiny_model(), prompt_len=0), ValueError, "prompt_len"),
    ("time_decode-too-long", lambda: decode_with(tiny_model(), prompt_len=6, new_tokens=6), ValueError, "block_size"),
    ("time_decode-data-short", lambda: decode_with(tiny_model(), data=data()[:2]), ValueError, "data"),
    ("serving_probe-size", lambda: serving.serving_probe(tiny_model(), None, "huge"), ValueError, "size"),
    # offload.py
    ("simulate_cache-capacity-float", lambda: offload.simulate_cache(TRACE, 2.0), TypeError, "capacity"),
    ("simulate_cache-keep-negative", lambda: offload.simulate_cache(TRACE, 2, "static", keep=[-1]), ValueError,
     "keep"),
    ("simulate_cache-keep-str", lambda: offload.simulate_cache(TRACE, 2, "static", keep="01"), TypeError, "keep"),
    ("simulate_cache-keep-float", lambda: offload.simulate_cache(TRACE, 2, "static", keep=[0.5]), TypeError, "keep"),
    ("simulate_cache-bypass-lru", lambda: offload.simulate_cache(TRACE, 2, bypass=True), ValueError, "bypass"),
    ("simulate_cache-trace-1d", lambda: offload.simulate_cache(T([0, 1]), 2), ValueError, "trace"),
    ("simulate_cache-trace-list-of-str", lambda: offload.simulate_cache([["a"]], 2), TypeError, "trace"),
    ("simulate_cache-prefetch-float", lambda: offload.simulate_cache(TRACE, 2, prefetch=TRACE.float()), TypeError,
     "prefetch"),
    ("hit_rate_curve-keep-short", lambda: offload.hit_rate_curve(TRACES, [1, 2], "static", keep=[[0]]), ValueError,
     "keep"),
    ("hit_rate_curve-traces-2d", lambda: offload.hit_rate_curve(TRACE, [1]), ValueError, "traces"),
    ("hit_rate_curve-capacity-0", lambda: offload.hit_rate_curve(TRACES, [0]), ValueError, "capacity"),
    ("hit_rate_curve-prefetch-short", lambda: offload.hit_rate_curve(TRACES, [1], prefetch=TRACES[:1]), ValueError,
     "prefetch"),
    ("batch_trace-batch-0", lambda: offload.batch_trace(TRACES, 0), ValueError, "batch"),
    ("batch_trace-batch-float", lambda: offload.batch_trace(TRACES, 1.0), TypeError, "batch"),
    ("random_trace-steps-negative", lambda: offload.random_trace(-1, 8, 2), ValueError, "steps"),
    ("random_trace-k-float", lambda: offload.random_trace(4, 8, 1.5), TypeError, "k must"),
    ("random_trace-k>N", lambda: offload.random_trace(4, 2, 3), ValueError, "k"),
    ("random_trace-sequences-0", lambda: offload.random_trace(4, 8, 2, sequences=0), ValueError, "sequences"),
    ("record_routing-idx-1d", lambda: offload.record_routing(tiny_model(), T([1, 2, 3])), ValueError, "idx"),
    ("record_routing-idx-float", lambda: offload.record_routing(tiny_model(), torch.zeros(1, 4)), TypeError, "idx"),
    ("record_routing-ahead-int", lambda: offload.record_routing(tiny_model(), torch.zeros(1, 4).long(), ahead=1),
     TypeError, "ahead"),
    ("prefetch_recall-1d", lambda: offload.prefetch_recall(T([0, 1, 2]), T([0, 1]), 1), ValueError, "ranking"),
    ("prefetch_recall-m-float", lambda: offload.prefetch_recall(T([[0, 1, 2]]), T([[0]]), 1.0), TypeError, "m must"),
    ("offload_seconds-loads-nan", lambda: offload.offload_seconds_per_token(math.nan, 0.0, 2, 1.0, 1.0), ValueError,
     "loads"),
    ("offload_seconds-prefetched-negative", lambda: offload.offload_seconds_per_token(0.5, -1.0, 2, 1.0, 1.0),
     ValueError, "prefetched"),
    ("offload_seconds-layers-negative", lambda: offload.offload_seconds_per_token(0.5, 0.0, -2, 1.0, 1.0), ValueError,
     "n_moe_layers"),
    ("offload_seconds-bandwidth-str", lambda: offload.offload_seconds_per_token(0.5, 0.0, 2, 1.0, "1e9"), TypeError,
     "link_bytes_per_s"),
    ("offload_seconds-compute-negative", lambda: offload.offload_seconds_per_token(0.5, 0.0, 2, 1.0, 1.0, -1.0),
     ValueError, "compute_s"),
    ("cache_counts-2d", lambda: offload.cache_counts(T([[0, 1]]), [1]), ValueError, "traces must be"),
    # the KV cache (model.py)
    ("generate_cached-empty-prompt", lambda: tiny_model().generate_cached(torch.zeros(1, 0).long(), 2), ValueError,
     "idx"),
    ("generate_cached-token>=vocab", lambda: tiny_model().generate_cached(T([[1, 256]]), 2), ValueError, "idx"),
    ("generate_cached-token-negative", lambda: tiny_model().generate_cached(T([[1, -1]]), 2), ValueError, "idx"),
    ("generate_cached-max_new_tokens-negative", lambda: tiny_model().generate_cached(T([[1, 2]]), -1), ValueError,
     "max_new_tokens must"),
    ("generate_cached-max_new_tokens-float", lambda: tiny_model().generate_cached(T([[1, 2]]), 2.0), TypeError,
     "max_new_tokens"),
    ("generate_cached-idx-1d", lambda: tiny_model().generate_cached(T([1, 2]), 2), ValueError, "idx"),
    ("generate_cached-idx-float", lambda: tiny_model().generate_cached(torch.zeros(1, 2), 2), TypeError, "idx"),
    ("generate_cached-temperature-nan", lambda: tiny_model().generate_cached(T([[1, 2]]), 2, math.nan), ValueError,
     "temperature"),
    ("generate-max_new_tokens-negative", lambda: tiny_model().generate(T([[1, 2]]), -1), ValueError,
     "max_new_tokens"),
    ("generate-token>=vocab", lambda: tiny_model().generate(T([[1, 300]]), 1), ValueError, "idx"),
    ("new_cache-batch-0", lambda: tiny_model().new_cache(0), ValueError, "batch"),
    ("new_cache-batch-float", lambda: tiny_model().new_cache(1.0), TypeError, "batch"),
    ("forward_cached-token>=vocab", lambda: tiny_model().forward_cached(T([[300]]), tiny_model().new_cache(1)),
     ValueError, "idx"),
    ("TinyLM-forward-token>=vocab", lambda: tiny_model()(T([[1, 256]])), ValueError, "idx"),
    ("TinyLM-forward-idx-float", lambda: tiny_model()(torch.zeros(1, 2)), TypeError, "idx"),
    ("TinyLM-forward-too-long", lambda: tiny_model()(torch.zeros(1, 9).long()), ValueError, "block_size"),
    ("TinyLM-forward-targets-shape", lambda: tiny_model()(torch.zeros(1, 4).long(), torch.zeros(1, 3).long()),
     ValueError, "targets"),
    # collectives.py
    ("send_tokens-x-1d", lambda: collectives.send_tokens(T([1.0, 2.0]), T([0, 0]), 1), ValueError, "x must"),
    ("send_tokens-no-process-group", lambda: collectives.send_tokens(X8, T([0, 0, 0]), 1), RuntimeError,
     "process group"),
    ("send_tokens-dest-outside", lambda: one_rank_group(lambda: collectives.send_tokens(X8, T([0, 1, 0]), 1)),
     ValueError, "dest"),
    ("send_tokens-dest-length", lambda: collectives.send_tokens(X8, T([0, 0]), 1), ValueError, "dest"),
    ("send_tokens-world-0", lambda: collectives.send_tokens(X8, T([0, 0, 0]), 0), ValueError, "world"),
    ("run-world-0", lambda: collectives.run(snapshot.main, 0), ValueError, "world"),
    ("run-unpicklable-args", lambda: collectives.run(snapshot.main, 1, lambda: 0), TypeError, "args"),
    ("run-args_by_rank-not-tuples", lambda: collectives.run(snapshot.main, 1, args_by_rank=[5]), TypeError,
     "args_by_rank"),
    ("exchange_inputs-world-0", lambda: collectives.exchange_inputs(0), ValueError, "world"),
    ("exchange_inputs-skip_rank-outside", lambda: collectives.exchange_inputs(2, skip_rank=2), ValueError,
     "skip_rank"),
    ("exchange_inputs-skip-only-rank", lambda: collectives.exchange_inputs(1, skip_rank=0), ValueError, "skip_rank"),
    ("exchange_inputs-d-0", lambda: collectives.exchange_inputs(2, d=0), ValueError, "d must"),
    ("exchange_inputs-rows-0", lambda: collectives.exchange_inputs(2, rows=0), ValueError, "rows must"),
    ("exchange_inputs-rows-100", lambda: collectives.exchange_inputs(2, rows=100), ValueError, "below 100"),
    ("exchange_inputs-dtype-bool", lambda: collectives.exchange_inputs(2, dtype=torch.bool), TypeError, "dtype"),
    ("exchange_inputs-dtype-str", lambda: collectives.exchange_inputs(2, dtype="float64"), TypeError, "dtype"),
    ("exchange_inputs-empty_rank-outside", lambda: collectives.exchange_inputs(2, empty_rank=2), ValueError,
     "empty_rank"),
    ("expected_received-empty", lambda: collectives.expected_received([]), ValueError, "inputs"),
    ("row_origins-1d", lambda: collectives.row_origins(T([100.0, 101.0])), ValueError, "out"),
    # snapshot.py
    ("read_snapshot-foreign-header", lambda: snapshot.read_snapshot(foreign_file()), snapshot.SnapshotError,
     "header"),
    ("read_index-not-an-index", lambda: snapshot.read_index(foreign_file()), snapshot.SnapshotError, "index"),
    ("snapshot_path-index-malformed", lambda: snapshot.snapshot_path("course", {"course": {}}),
     snapshot.SnapshotError, "index"),
    ("write_snapshot-train-str", lambda: snapshot.write_snapshot(foreign_file("x.xz"), {}, "ab", b"", b"ab", b""),
     TypeError, "train"),
    # course/links.py
    ("repo_slug-None", lambda: links.repo_slug(None), TypeError, "repo_url"),
    ("repo_slug-not-a-repository", lambda: links.repo_slug("https://github.com/owner/repo/issues/3"), ValueError,
     "repo_url"),
    ("repo_slug-bad-name", lambda: links.repo_slug("https://github.com/own er/re po"), ValueError, "repo_url"),
    ("colab_url-branch-with-space", lambda: links.colab_url("notebooks/00_welcome.ipynb", branch="my branch"),
     ValueError, "branch"),
    ("binder_url-branch-int", lambda: links.binder_url(branch=3), TypeError, "branch"),
    ("colab_url-path-int", lambda: links.colab_url(5), TypeError, "notebook_path"),
    ("stamp_readme-text-bytes", lambda: links.stamp_readme(b"x"), TypeError, "text"),
    ("set_repo-branch-with-space", lambda: links.set_repo("a/b", branch="a b", root="/nonexistent"), ValueError,
     "branch"),
    # metrics.py
    ("paired_gaps-strings", lambda: metrics.paired_gaps(["1.0", "2.0"], [1.0, 2.0]), TypeError, "a must"),
    ("paired_gaps-tensors", lambda: metrics.paired_gaps(T([1.0, 2.0]), T([1.0, 2.0])), TypeError, "a must"),
    ("paired_gaps-nan", lambda: metrics.paired_gaps([1.0, math.nan], [1.0, 2.0]), ValueError, "a must"),
    ("paired_gaps-str-whole", lambda: metrics.paired_gaps("12", "34"), TypeError, "a must"),
    ("paired_gaps-one-seed", lambda: metrics.paired_gaps([1.0], [2.0]), ValueError, "at least 2"),
    ("paired_gaps-confidence-1", lambda: metrics.paired_gaps([1.0, 2.0], [1.0, 2.5], confidence=1.0), ValueError,
     "confidence"),
    ("paired_gaps-confidence-str", lambda: metrics.paired_gaps([1.0, 2.0], [1.0, 2.5], confidence="95%"), TypeError,
     "confidence"),
    ("t_quantile-q-0", lambda: metrics.t_quantile(0.0, 4), ValueError, "q must"),
    ("t_quantile-q-above-1", lambda: metrics.t_quantile(1.5, 4), ValueError, "q must"),
    ("t_quantile-df-0", lambda: metrics.t_quantile(0.975, 0), ValueError, "df must"),
    ("t_cdf-df-float", lambda: metrics.t_cdf(1.0, 2.5), TypeError, "df must"),
    ("mean_std-nan", lambda: metrics.mean_std([1.0, math.nan]), ValueError, "values"),
    ("mean_std-str", lambda: metrics.mean_std("12"), TypeError, "values"),
    ("expert_counts-float", lambda: metrics.expert_counts(T([[0.5, 1.0]]), 4), TypeError, "indices"),
    ("expert_counts-n_experts-0", lambda: metrics.expert_counts(T([[0, 1]]), 0), ValueError, "n_experts"),
    ("max_violation-nan", lambda: metrics.max_violation(T([0.5, math.nan])), ValueError, "load"),
    ("max_violation-negative", lambda: metrics.max_violation(T([0.5, -0.5, 1.0])), ValueError, "load"),
    ("load_entropy-negative", lambda: metrics.load_entropy(T([0.5, -0.5, 1.0])), ValueError, "load"),
    ("routing_entropy-negative", lambda: metrics.routing_entropy(T([[0.5, -0.5]])), ValueError, "scores"),
    ("mfu-tokens-negative", lambda: metrics.mfu(-1.0, 1e6, "H100"), ValueError, "tokens_per_s"),
    ("mfu-device-int", lambda: metrics.mfu(1.0, 1e6, 5), TypeError, "device_name"),
    # corpus.py
    ("load_corpus-max_bytes-10", lambda: corpus.load_corpus(max_bytes=10), ValueError, "max_bytes"),
    ("load_corpus-max_bytes-float", lambda: corpus.load_corpus(max_bytes=1e4), TypeError, "max_bytes"),
    ("load_corpus-max_bytes-bool", lambda: corpus.load_corpus(max_bytes=True), TypeError, "max_bytes"),
    ("get_batch-block-too-long", lambda: corpus.get_batch(data()[:10], 2, 10), ValueError, "block_size"),
    ("get_batch-batch_size-0", lambda: corpus.get_batch(data(), 0, 4), ValueError, "batch_size"),
    ("get_batch-data-2d", lambda: corpus.get_batch(data()[None], 2, 4), ValueError, "data"),
    ("get_batch-types-length", lambda: corpus.get_batch(data(), 2, 4, types=types()[:10]), ValueError, "types"),
    ("encode-bytes", lambda: corpus.encode(b"x"), TypeError, "text"),
    ("decode-out-of-range", lambda: corpus.decode([65, 300]), ValueError, "tokens"),
    ("decode-negative", lambda: corpus.decode([-1]), ValueError, "tokens"),
    # parallel.py, dispatch.py, fine_grained.py, local_experts.py: the older rows still open
    ("ExpertParallelMoE-no-process-group", lambda: parallel.ExpertParallelMoE.from_moe(moe_layer(), 0, 1)(X8),
     RuntimeError, "process group"),
    ("ExpertParallelMoE-world-0", lambda: parallel.ExpertParallelMoE(moe_layer(), 0, 0), ValueError, "world"),
    ("shared_moe_forward-k>N", lambda: fine_grained.shared_moe_forward(X8, torch.randn(4, 8), experts4(), [], 5),
     ValueError, "k"),
    ("shared_moe_forward-k-0", lambda: fine_grained.shared_moe_forward(X8, torch.randn(4, 8), experts4(), [], 0),
     ValueError, "k"),
    ("shared_moe_forward-gate-rows", lambda: fine_grained.shared_moe_forward(X8, torch.randn(3, 8), experts4(), [],
                                                                             2), ValueError, "gate_weight"),
    ("shared_moe_forward-x-1d", lambda: fine_grained.shared_moe_forward(torch.randn(8), torch.randn(4, 8),
                                                                        experts4(), [], 2), ValueError, "x must"),
    ("dispatch_sorted-indices-float", lambda: dispatch.dispatch_sorted(X8, torch.ones(3, 2), torch.ones(3, 2),
                                                                       experts4()), TypeError, "indices"),
    ("dispatch_loop-indices-float", lambda: dispatch.dispatch_loop(X8, torch.ones(3, 2), torch.ones(3, 2),
                                                                   experts4()), TypeError, "indices"),
    ("dispatch_dense-indices-float", lambda: dispatch.dispatch_dense(X8, torch.ones(3, 2), torch.ones(3, 2),
                                                                     experts4()), TypeError, "indices"),
    ("sort_by_expert-1d", lambda: dispatch.sort_by_expert(T([0, 1]), 4), ValueError, "indices"),
    ("sort_by_expert-float", lambda: dispatch.sort_by_expert(T([[0.0, 1.0]]), 4), TypeError, "indices"),
    ("sort_by_expert-id>=N", lambda: dispatch.sort_by_expert(T([[0, 4]]), 4), ValueError, "indices"),
    ("combine-n_tokens-negative", lambda: dispatch.combine(torch.ones(2, 3), torch.ones(2), T([0, 1]), -1),
     ValueError, "n_tokens"),
    ("combine-token-outside", lambda: dispatch.combine(torch.ones(2, 3), torch.ones(2), T([0, 5]), 2), ValueError,
     "token"),
    ("capacity_mask-capacity-negative", lambda: dispatch.capacity_mask(T([[0, 1]]), 4, -1), ValueError, "capacity"),
    ("get_dispatcher-unknown", lambda: dispatch.get_dispatcher("fast"), ValueError, "fast"),
    ("cooperative_loss-no-cases", lambda: local_experts.cooperative_loss(torch.zeros(0, 2), torch.zeros(0, 2, 1),
                                                                         torch.zeros(0, 1)), ValueError, "p"),
    ("competitive_loss-no-cases", lambda: local_experts.competitive_loss(torch.zeros(0, 2), torch.zeros(0, 2, 1),
                                                                         torch.zeros(0, 1)), ValueError, "p"),
    ("weighted_squared_error-no-cases", lambda: local_experts.weighted_squared_error(
        torch.zeros(0, 2), torch.zeros(0, 2, 1), torch.zeros(0, 1)), ValueError, "p"),
    ("responsibilities-no-cases", lambda: local_experts.responsibilities(torch.zeros(0, 2), torch.zeros(0, 2, 1),
                                                                         torch.zeros(0, 1)), ValueError, "p"),
    ("MoE-token-dim", lambda: moe_layer()(torch.randn(3, 5)), ValueError, "x"),
    ("MoE-x-int", lambda: moe_layer()(torch.zeros(3, 8, dtype=torch.long)), TypeError, "x"),
    ("TrainConfig-warmup>steps", lambda: TrainConfig(steps=10, warmup=1000), ValueError, "warmup"),
]


@pytest.mark.parametrize(("call", "error", "argument"), [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_raises_a_named_error_at_entry(call, error, argument):
    with pytest.raises(Exception) as info:  # noqa: B017, PT011 - the type is asserted below, with the message
        call()
    assert info.type is error, f"raised {info.type.__name__}: {info.value}"
    message = str(info.value)
    assert argument in message, f"the message does not name {argument!r}: {message}"
    assert len(message) > len(argument) + 20, f"the message does not say what is expected: {message}"
    innermost = Path(info.traceback[-1].path).resolve()
    assert PACKAGE in innermost.parents, f"raised inside {innermost}, not at the entry of a moe_course function"


def test_row_ids_are_unique():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "z_loss", "--size", "smoke", "--seeds", "-1"], "--seeds"),
        (["run", "z_loss", "--size", "smoke", "--seeds", "0", "0"], "--seeds"),
        (["run", "z_loss", "--size", "smoke", "--device", "tpu"], "--device"),
        (["run", "z_loss", "--size", "smoke", "--device", "cpu", "--threads", "0"], "--threads"),
        (["run", "z_loss", "--size", "smoke", "--device", "cpu", "--jobs", "0"], "--jobs"),
    ],
)
def test_experiments_cli_names_the_bad_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        experiments.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage" in err and flag in err


# ---------------------------------------------------------------------------------------------------------
# valid inputs next to the bad ones still work, with the same numbers


def test_valid_inputs_still_work():
    scores = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    w, i = routing.select_topk(scores, 2, bias=torch.zeros(8))
    assert torch.equal(w, routing.select_topk(scores, 2)[0]) and i.shape == (5, 2)
    routing.select_topk(scores, 2, bias=torch.zeros(5, 8))  # a per-token bias (TopKRouter.mask_top)
    routing.select_topk(scores, 2, bias=torch.zeros(1, 8))  # broadcast over tokens
    routing.sigmoid_topk(torch.randn(5, 8), 4, n_groups=4, topk_groups=2)  # k = 4 fits in 2 groups of 2
    assert routing.expert_choice_capacity(16, 4, 2) == 8  # an int factor
    assert routing.expert_choice(torch.rand(3, 4), 3)[1].shape == (4, 3)
    hash_forward(T([[0, 9], [3, 4]]))  # (B, S) token ids at the vocabulary's edges
    assert balancing.switch_aux_loss(torch.rand(0, 4), torch.zeros(0, 2, dtype=torch.long), 4).item() == 0.0
    assert balancing.router_z_loss(torch.zeros(0, 4)).item() == 0.0
    assert torch.equal(balancing.bias_update(torch.zeros(3), T([1.0, 2.0, 3.0]), 1), T([1.0, 0.0, -1.0]))
    assert parallel.send_counts(T([[0, 7], [3, 4]]), 8, 2).tolist() == [2, 2]
    assert parallel.expert_owner(torch.zeros(0, dtype=torch.long), 8, 2).numel() == 0
    assert analysis.mutual_information(T([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert analysis.random_router_table(T([[2, 0], [0, 2]])).sum() == 4
    with analysis.mask_top_experts(tiny_model(), 2):  # N - k = 2 experts can be masked
        pass
    with analysis.mask_top_experts(dense_model(), 0):  # m = 0 on a dense model: nothing to do
        pass
    capstone.route_text(tiny_model(), b"x = 1\n")  # UTF-8 bytes are text too
    assert len(capstone_plots.expert_colors(40)) == 40
    ModelConfig(n_groups=4, topk_groups=2, top_k=4, router_score="sigmoid")
    ModelConfig(router="expert_choice", aux_loss_coef=0.0, capacity_factor=2.0)
    ModelConfig(ffn="dense", moe_every=9, n_layer=2)  # MoE settings do not matter to a dense model
    replace(experiments.base_model("cpu"), n_layer=2, moe_every=2)
    loss_free.LossFreeRecorder(2, TRAIN_CFG, data(), probe=(torch.zeros(1, 4).long(), torch.zeros(1, 4).long()))


def test_value_checks_in_training_paths_do_not_read_accelerator_tensors():
    """Range and count checks read tensor values on the CPU only: on a GPU reading them would wait for the device
    (a host-device sync per layer and step). Meta tensors have no values at all, so reading one would raise."""
    meta = torch.device("meta")
    ids = torch.zeros(3, 2, dtype=torch.long, device=meta)
    assert balancing.switch_aux_loss(torch.rand(3, 4, device=meta), ids, 4).is_meta
    assert balancing.sequence_aux_loss(torch.rand(1, 3, 4, device=meta), ids[None], 4).is_meta
    assert balancing.bias_update(torch.zeros(4, device=meta), torch.zeros(4, device=meta), 1e-3).is_meta
    assert parallel.expert_owner(ids, 4, 2).is_meta
    router = routing.HashRouter(4, vocab_size=10, k=2).to(meta)
    assert router(torch.zeros(3, 8, device=meta), torch.zeros(3, dtype=torch.long, device=meta)).indices.is_meta
    with pytest.raises(ValueError, match="n_experts"):  # shapes are still checked: they cost nothing
        balancing.switch_aux_loss(torch.rand(3, 5, device=meta), ids, 4)


def test_model_settings_still_build():
    assert len(tiny_model(moe_every=2).moe_layers()) == 1
    assert MoE(8, 16, 4, 2, router="hash").router.table.shape == (256, 2)


# ---------------------------------------------------------------------------------------------------------
# issue 26: command lines check every path and setting before any work; the inputs that legitimately pass


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--json", "{file}/run.json"], "--json"),
        (["--out", "{file}/checkpoints"], "--out"),
        (["--set", "warmup=1000"], "warmup"),
    ],
)
def test_train_cli_refuses_bad_paths_and_settings_before_training(argv, flag, tmp_path, capsys):
    from moe_course import train
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "a_file")) for a in argv]
    with pytest.raises(SystemExit) as exc:  # without --dry-run: it would train if the checks passed
        train.main(["--preset", "smoke", "--device", "cpu", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "preset smoke:" not in err


@pytest.mark.parametrize("content", [None, b"not a snapshot", "foreign"])
def test_snapshot_cli_prints_one_line_for_a_missing_or_foreign_file(content, tmp_path, capsys):
    path = tmp_path / "x.xz"
    if content == "foreign":
        path = foreign_file()
    elif content is not None:
        path.write_bytes(content)
    assert snapshot.main(["digest", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


LEGITIMATE_PASSES = [
    # (id, call, why it passes)
    ("MoE-empty-batch", lambda: moe_layer()(torch.zeros(0, 8)),
     "an empty batch gives an empty output: a data loader's last, empty shard must not crash the layer"),
    ("TinyLM-empty-sequence", lambda: tiny_model()(torch.zeros(2, 0).long()),
     "T = 0 gives (B, 0, V) logits, as any sequence model would; only generation needs a prompt"),
    ("MoE-nan-tokens", lambda: moe_layer()(torch.full((3, 8), math.nan)),
     "NaN propagates through a forward pass: checking every activation would sync the GPU in each layer, and "
     "the training loop already skips non-finite losses"),
    ("switch_aux_loss-no-tokens", lambda: balancing.switch_aux_loss(torch.rand(0, 4), torch.zeros(0, 2).long(), 4),
     "no tokens, no imbalance: 0, so summing the losses of layers over an empty batch stays finite"),
    ("importance_loss-no-tokens", lambda: balancing.importance_loss(torch.zeros(0, 4)), "the same, for CV²: 0"),
    ("router_z_loss-no-tokens", lambda: balancing.router_z_loss(torch.zeros(0, 4)), "the same: 0"),
    ("expected_distinct-batch-0", lambda: serving.expected_distinct_experts(8, 8, 0),
     "B = 0 tokens use 0 experts (k = N included): the formula's value, and the exercise's edge case"),
    ("dispatch_sorted-no-tokens", lambda: dispatch.dispatch_sorted(torch.zeros(0, 8), torch.zeros(0, 2),
                                                                   torch.zeros(0, 2).long(), experts4()),
     "an empty batch dispatches nothing and returns (0, d)"),
    ("simulate_cache-empty-trace", lambda: offload.simulate_cache(torch.zeros(0, 2).long(), 2),
     "no steps, no requests: hit rate 0.0 by the documented convention"),
    ("random_trace-0-steps", lambda: offload.random_trace(0, 8, 2), "zero steps is an empty trace (T = 0)"),
    ("max_violation-all-zero", lambda: metrics.max_violation(torch.zeros(4)),
     "an empty batch's counts are even by convention (documented): 0"),
]


@pytest.mark.parametrize(("call", "why"), [pytest.param(c, w, id=i) for i, c, w in LEGITIMATE_PASSES])
def test_legitimate_inputs_pass(call, why):
    """Inputs that look odd but have a well-defined answer: each passes on purpose, for the reason given."""
    assert why
    call()


# Public functions whose bad inputs are checked elsewhere, or that take nothing a caller can get wrong
EXEMPT = {
    "moe_course.device": "pick_device, has_gpu, seed_everything, environment_report, cpu_threads: tests/test_imports",
    "moe_course.timing": "timers of any callable; repeats and warmup checked in tests/test_timing.py",
    "moe_course.train": "the CLI is covered above and in tests/test_cli.py; TrainConfig by a row",
    "moe_course.synthetic": "checked in tests/test_synthetic.py (sizes and noise)",
    "moe_course.experts": "layers built by MoE, whose arguments validate_moe_args checks (rows of test_layer_parts)",
    "moe_course.params": "configs checked in tests/test_params.py",
    "moe_course.validate": "the checks themselves",
    "moe_course.moe": "validate_moe_args and MoE: rows above and tests/test_layer_parts.py",
    "moe_course.model": "ModelConfig and TinyLM: rows above",
}
WHY_NO_ROW = {  # single functions of the checked modules, each with where its bad inputs are tested instead
    **dict.fromkeys(["corpus.cache_path", "corpus.corpus_files", "corpus.corpus_sha256", "corpus.default_cache_dir",
                     "corpus.freeze", "corpus.is_val_file", "corpus.label_token_types", "corpus.make_manifest",
                     "corpus.read_manifest", "corpus.split_files", "corpus.stdlib_dir", "corpus.train_bytes",
                     "corpus.val_part_of", "corpus.write_manifest"],
                    "corpus build and manifest tooling: names are checked by _check_name (tests/test_corpus*.py)"),
    **dict.fromkeys(["local_experts.confident_fraction", "local_experts.count_params",
                     "local_experts.expert_region_mse", "local_experts.expert_regions", "local_experts.matched_mlp",
                     "local_experts.mlp",
                     "local_experts.partition_purity", "local_experts.specialisation_report",
                     "local_experts.train_mixture"],
                    "notebook 01's toolkit: argument errors in tests/test_local_experts.py"),
    **dict.fromkeys(["fine_grained.comparison_configs", "fine_grained.expert_similarity",
                     "fine_grained.fine_grained_config", "fine_grained.n_combinations", "fine_grained.param_table"],
                    "tests/test_fine_grained.py (expert_similarity delegates to analysis, which has rows)"),
    "loss_free.bias_probe": "tests/test_loss_free.py (a probe: a model without a routing bias gives {})",
    **dict.fromkeys(["loss_free.check_size", "loss_free.course_model", "loss_free.course_train", "loss_free.final",
                     "loss_free.max_vio_batch"], "tests/test_loss_free.py"),
    "links.binder_badge": "wraps binder_url, which has rows",
    "links.colab_badge": "wraps colab_url, which has rows",
    "offload.lru_hit_rate": "wraps simulate_cache, which has rows",
    "snapshot.digest": "wraps read_snapshot, which has rows (and the CLI test above)",
    "serving.dense_twin": "copies a config; ModelConfig checks the copy",
    "analysis.shared_output_share": "tests/test_analysis.py",
    "capstone.equal_active_moe": "builds a ModelConfig, which checks every field",
    "parallel.all_to_all": "the collective inside ExpertParallelMoE, which has rows",
    "parallel.fail_on_rank": "a deliberate failure for the launcher's tests",
}
def concept_modules() -> list[str]:
    """The concept modules at the top of moe_course (plots/, experiments/ and course/ are not), plus links."""
    names = [p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")]
    return sorted(f"moe_course.{n}" for n in names) + ["moe_course.course.links"]


def test_every_public_function_of_a_concept_module_has_a_bad_input_row():
    """A new public function of a concept module needs a row above (its name in a row's call), or its module an
    entry in EXEMPT, or the function one in WHY_NO_ROW, that says where its bad inputs are tested or why none."""
    import importlib
    import inspect
    rows_source = inspect.getsource(__import__(__name__))
    missing = []
    for name in concept_modules():
        if name in EXEMPT:
            continue
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            short = f"{name.rsplit('.', 1)[1]}.{attr}"
            if inspect.isfunction(obj) and obj.__module__ == name and short not in WHY_NO_ROW \
                    and f"{attr}(" not in rows_source:
                missing.append(f"{name}.{attr}")
    assert not missing, f"public functions without a bad-input row (add one, or an EXEMPT entry): {missing}"
