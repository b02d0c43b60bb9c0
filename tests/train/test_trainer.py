"""The pure training core: loss, accumulation, remat, decay mask, shardings, FLOPs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_repl.model.modeling import KVCache, init_cache
from codegen_repl.train import trainer
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.loop import resolve_config
from tests.train.conftest import tiny_config


@pytest.fixture(scope="module")
def base(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """The standard test run's config (batch 4 x 32 tokens), so its compiled functions are
    shared with test_loop.py."""
    return resolve_config(tiny_config(dataset, tmp_path_factory.mktemp("unused")))[0]


def rows(seed: int, batch: int = 4, seq: int = 32) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 600, (batch, seq)).astype(np.int32)
    ids[-1, -5:] = -1  # the padded tail of a split
    return ids


def functions(cfg: TrainConfig) -> trainer.Compiled:
    return trainer.compiled(cfg, trainer.training_mesh(cfg))


def one_step(cfg: TrainConfig, batch: np.ndarray) -> tuple[trainer.TrainState, dict]:
    compiled = functions(cfg)
    layout = batch.reshape(cfg.grad_accum, -1, batch.shape[-1])  # [accum, micro, seq]
    return compiled.train_step(compiled.init(), jnp.asarray(layout))


def test_loss_counts_only_real_targets(base: TrainConfig) -> None:
    params = functions(base).init().params
    batch = rows(0)
    total, count = functions(base).eval_step(params, jnp.asarray(batch))
    # Each row predicts its next 31 tokens; the padded row loses the 5 targets that are PAD.
    assert int(count) == 4 * 31 - 5
    logits, _ = trainer.make_model(base).apply({"params": params}, jnp.maximum(batch, 0))
    logp = np.asarray(jax.nn.log_softmax(logits))  # [batch, seq, vocab]
    targets = batch[:, 1:]
    picked = np.take_along_axis(logp[:, :-1], np.maximum(targets, 0)[..., None], -1)[..., 0]
    expected = -np.sum(np.where(targets >= 0, picked, 0.0))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_gradient_accumulation_gives_the_same_step(base: TrainConfig) -> None:
    batch = rows(1)
    whole, whole_metrics = one_step(base, batch)
    accumulated, accum_metrics = one_step(dataclasses.replace(base, grad_accum=2), batch)
    assert float(whole_metrics["loss"]) == pytest.approx(float(accum_metrics["loss"]), rel=1e-6)
    assert int(whole_metrics["tokens"]) == int(accum_metrics["tokens"]) == 4 * 31 - 5
    for a, b in zip(
        jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_changes_memory_not_results(base: TrainConfig) -> None:
    batch = rows(2)
    _, plain = one_step(base, batch)
    _, remat = one_step(dataclasses.replace(base, remat=True), batch)
    assert float(plain["loss"]) == float(remat["loss"])
    np.testing.assert_allclose(float(plain["grad_norm"]), float(remat["grad_norm"]), rtol=1e-6)


def test_weight_decay_skips_layer_norms_and_biases(base: TrainConfig) -> None:
    mask = trainer.decay_mask(jax.eval_shape(functions(base).init).params)
    assert mask["wte"]["embedding"] and mask["lm_head"]["kernel"]
    assert mask["block_0"]["attn"]["qkv"]["kernel"] and mask["block_1"]["mlp"]["fc_in"]["kernel"]
    assert not mask["lm_head"]["bias"] and not mask["block_0"]["mlp"]["fc_out"]["bias"]
    assert not mask["ln_f"]["scale"] and not mask["block_0"]["ln"]["bias"]


def test_schedule_warms_up_then_decays_to_the_floor(base: TrainConfig) -> None:
    cfg = dataclasses.replace(base, steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    schedule = trainer.learning_rate(cfg)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_flops_count_every_matmul_parameter(base: TrainConfig) -> None:
    params = jax.eval_shape(functions(base).init).params
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    matmul = total - int(np.prod(params["wte"]["embedding"].shape))  # a lookup, not a matmul
    attention = 6 * base.model.num_layers * 32 * base.model.hidden_size
    assert trainer.flops_per_token(base, 32) == 6 * matmul + attention


def test_optimizer_moments_follow_their_parameters(base: TrainConfig) -> None:
    abstract = jax.eval_shape(functions(base).init)
    mesh = trainer.make_mesh(1, 1, 1)
    shardings = trainer.state_shardings(abstract, mesh)
    params = jax.tree_util.tree_leaves_with_path(abstract.params)
    for moment in ("mu", "nu"):
        leaves = [
            (path, leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.opt_state)
            if f".{moment}" in jax.tree_util.keystr(path)
        ]
        assert [leaf.shape for _, leaf in leaves] == [leaf.shape for _, leaf in params]
    assert str(jax.tree.structure(shardings.params)) == str(jax.tree.structure(abstract.params))


def test_training_forward_runs_the_fused_attention(base: TrainConfig) -> None:
    """The train step's program holds model/attention.py's causal_attention in every layer."""
    compiled = functions(base)
    batch = jnp.asarray(rows(3).reshape(1, 4, 32))
    text = compiled.train_step.lower(compiled.init(), batch).as_text(debug_info=True)
    for layer in range(base.model.num_layers):
        assert f"block_{layer}/attn/causal_attention" in text


def test_fused_attention_gives_the_cached_paths_loss_and_gradients(base: TrainConfig) -> None:
    """fp32: the training forward (no cache: causal_attention) against the model's cached
    attention (the sampling path, writing into an empty cache), loss and every gradient."""
    model = trainer.make_model(base)
    params = functions(base).init().params
    batch = rows(4)
    inputs, targets = jnp.asarray(np.maximum(batch, 0)), batch[:, 1:]

    def loss(params: trainer.Params, cache: KVCache | None) -> jax.Array:
        logits, _ = model.apply({"params": params}, inputs, cache=cache)
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(targets >= 0, picked, 0.0))

    fused_loss, fused = jax.value_and_grad(loss)(params, None)
    empty = init_cache(base.model, *batch.shape, jnp.float32)
    cached_loss, cached = jax.value_and_grad(loss)(params, empty)
    assert float(fused_loss) == pytest.approx(float(cached_loss), rel=1e-6)
    worst = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(cached), strict=True)
    )
    print(f"largest relative gradient difference {worst:.2e}")
    assert worst < 1e-5  # fp32; measured 4.8e-7
