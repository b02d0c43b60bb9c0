"""The pure training core: model, loss, optimizer, shardings, `train_step` and `eval_step`.

Nothing here reads files or clocks. `train_step(state, batch) -> (state, metrics)` is jitted
once with the state's NamedShardings (params and the matching optimizer moments split by
`model/sharding.py`'s rules; batches split over the data and fsdp axes), so the same code runs
on one CPU, one GPU, or a pod slice; XLA inserts the collectives.

Numerics: fp32 master weights and optimizer state; activations in `compute_dtype` (bf16 on
accelerators); logits, softmax and the loss in fp32. Attention is the model's no-cache path,
one fused causal attention per layer (model/attention.py: cuDNN flash attention on NVIDIA GPUs
in bf16, so no [batch, heads, seq, seq] scores are kept for the backward pass). Gradient
accumulation sums per-token losses over micro-batches and divides once by the batch's target
count, so any `grad_accum` gives the gradient of the same mean loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codegen_repl.errors import ConfigError
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen
from codegen_repl.model.sharding import DATA, FSDP, make_mesh, param_shardings
from codegen_repl.train.config import TrainConfig

Params = dict[str, Any]
COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
NO_DECAY = ("bias", "scale")  # LayerNorm scales and every bias


@flax.struct.dataclass
class TrainState:
    # Any: the same tree also holds shardings (state_shardings) and shapes (jax.eval_shape).
    step: Any  # int32 []
    params: Params  # fp32 master weights
    opt_state: optax.OptState
    rng: Any  # uint32 [2]; CodeGen has no dropout, kept for exact resumes of variants


# --------------------------------------------------------------------------------- model and loss


def make_model(config: TrainConfig) -> CodeGen:
    return CodeGen(
        config.model,
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        param_dtype=jnp.float32,
        remat=config.remat,
    )


def token_loss_sum(model: CodeGen, params: Params, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of targets.

    Args:
        rows: [batch, seq] int32 packed ids; PAD (-1) after a split's last token.
    Returns:
        (loss sum fp32 [], target count int32 []). Position t predicts rows[:, t + 1]; the last
        position of a row and PAD targets do not count.
    """
    inputs = jnp.maximum(rows, 0)  # PAD inputs come after every real token: never attended
    targets = jnp.concatenate([rows[:, 1:], jnp.full_like(rows[:, :1], -1)], axis=1)
    logits, _ = model.apply({"params": params}, inputs)  # [batch, seq, vocab] fp32
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [batch, seq]
    mask = targets >= 0
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask, dtype=jnp.int32)


# --------------------------------------------------------------------------------- optimizer


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine to lr * min_lr_ratio at the last step."""
    warmup = min(config.warmup_steps, config.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def decay_mask(params: Params) -> Params:
    """True for matrices and embeddings; LayerNorm and biases get no weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY, params
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )


# --------------------------------------------------------------------------------- state and mesh


def init_state(
    config: TrainConfig, tx: optax.GradientTransformation, params: Params | None = None
) -> TrainState:
    """A fresh state (random params from `config.seed`, or the given ones)."""
    key = jax.random.PRNGKey(config.seed)
    if params is None:
        dummy = jnp.zeros((1, 8), jnp.int32)
        params = make_model(config).init(jax.random.fold_in(key, 0), dummy)["params"]
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.fold_in(key, 1),
    )


def training_mesh(config: TrainConfig) -> Mesh:
    mesh = make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    batch_ways = mesh.shape[DATA] * mesh.shape[FSDP]
    if config.micro_batch % batch_ways:
        raise ConfigError(
            f"each accumulation step's batch ({config.micro_batch} = batch_size / grad_accum) "
            f"must split evenly over data x fsdp = {batch_ways} devices; change batch_size, "
            "grad_accum or the mesh"
        )
    return mesh


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings of the whole state: params by their rules, each optimizer leaf like the
    parameter it mirrors (matched by path and shape), everything else replicated."""
    params = param_shardings(abstract.params, mesh)
    by_path = {
        _names(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(abstract.params),
            jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NamedSharding)),
            strict=True,
        )
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_param(path: tuple, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        names = _names(path)
        for start in range(len(names)):
            match = by_path.get(names[start:])
            if match and match[0] == leaf.shape:
                return match[1]
        return replicated

    opt_state = jax.tree_util.tree_map_with_path(like_param, abstract.opt_state)
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[grad_accum, micro_batch, seq]: the micro-batch is split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(None, (DATA, FSDP), None))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq], split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec((DATA, FSDP), None))


# --------------------------------------------------------------------------------- steps


def make_train_step(
    config: TrainConfig, tx: optax.GradientTransformation, shardings: TrainState
) -> Any:
    """The jitted `train_step(state, batch [grad_accum, micro_batch, seq]) -> (state, metrics)`;
    the old state's buffers are donated."""
    model = make_model(config)
    schedule = learning_rate(config)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        def summed_loss(params: Params, rows: jax.Array) -> tuple[jax.Array, tuple]:
            total, count = token_loss_sum(model, params, rows)
            return total, (total, count)

        grad_fn = jax.grad(summed_loss, has_aux=True)
        grads, loss_sum, count = _summed_gradients(grad_fn, state.params, batch, shardings)
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=state.rng,
        )
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": count,
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def _summed_gradients(
    grad_fn: Any, params: Params, batch: jax.Array, shardings: TrainState
) -> tuple[Params, jax.Array, jax.Array]:
    """Gradient, loss and target count summed over the micro-batches of `batch`
    [grad_accum, micro_batch, seq]; `grad_fn(params, rows) -> (grads, (loss sum, count))`."""
    if batch.shape[0] == 1:  # no accumulation: no loop and no zero-filled sum to add into
        grads, (loss_sum, count) = grad_fn(params, batch[0])
        return grads, loss_sum, count

    def accumulate(carry: tuple, rows: jax.Array) -> tuple[tuple, None]:
        grads, loss_sum, count = carry
        # One forward and backward pass gives the gradient and the (loss sum, count) aux.
        step_grads, (step_loss, step_count) = grad_fn(params, rows)
        grads = jax.tree.map(jnp.add, grads, step_grads)
        return (grads, loss_sum + step_loss, count + step_count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
    start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, start, batch)
    return grads, loss_sum, count


def make_eval_step(config: TrainConfig, shardings: TrainState) -> Any:
    """The jitted `eval_step(params, batch [batch, seq]) -> (loss sum, target count)`."""
    model = make_model(config)
    return jax.jit(
        lambda params, rows: token_loss_sum(model, params, rows),
        in_shardings=(shardings.params, None),
    )


def make_init(config: TrainConfig, tx: optax.GradientTransformation, shardings: TrainState) -> Any:
    """A jitted `init_state`: each device creates only its own shard of params and moments."""
    return jax.jit(lambda: init_state(config, tx), out_shardings=shardings)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The jitted functions of one run configuration on one mesh."""

    abstract: TrainState  # shapes and dtypes of the state
    shardings: TrainState
    init: Any  # () -> TrainState
    train_step: Any  # (state, batch) -> (state, metrics)
    eval_step: Any  # (params, rows) -> (loss sum, count)


def compiled(config: TrainConfig, mesh: Mesh) -> Compiled:
    """The run's jitted functions, shared by every run of the same step configuration in this
    process (a resumed run, a notebook training twice) so XLA compiles them once."""
    # Fields that change no compiled function are reset, so they do not split the cache.
    defaults = TrainConfig(model=config.model)
    ignored = (
        "data", "out", "init_from", "log_every", "eval_every", "eval_batches", "save_every",
        "keep_checkpoints", "loader_workers", "peak_tflops",
    )  # fmt: skip
    key = dataclasses.replace(config, **{name: getattr(defaults, name) for name in ignored})
    model = dataclasses.replace(config.model, bos_token_id=0, eos_token_id=0, hub_id=None)
    return _compiled(dataclasses.replace(key, model=model), mesh)


@functools.lru_cache(maxsize=8)
def _compiled(config: TrainConfig, mesh: Mesh) -> Compiled:
    tx = make_optimizer(config)
    abstract = jax.eval_shape(lambda: init_state(config, tx))
    shardings = state_shardings(abstract, mesh)
    return Compiled(
        abstract=abstract,
        shardings=shardings,
        init=_compiled_init(config.model, config.seed, mesh),
        train_step=make_train_step(config, tx, shardings),
        eval_step=make_eval_step(config, shardings),
    )


@functools.lru_cache(maxsize=8)
def _compiled_init(model: CodeGenConfig, seed: int, mesh: Mesh) -> Any:
    """The jitted init depends only on the shapes and the seed: the optimizer state's structure
    is the same for every learning rate, schedule and decay setting."""
    config = TrainConfig(model=model, seed=seed)
    tx = make_optimizer(config)
    abstract = jax.eval_shape(lambda: init_state(config, tx))
    return make_init(config, tx, state_shardings(abstract, mesh))


# --------------------------------------------------------------------------------- FLOPs


def flops_per_token(config: TrainConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters in matmuls, i.e. all but the embedding
    lookup) plus causal attention, 6 L s d (scores and mixing, 2 s d each forward at half the
    positions on average, times 3 for forward + backward)."""
    model = config.model
    d, inner, vocab, layers = (
        model.hidden_size,
        model.intermediate_size,
        model.vocab_size,
        model.num_layers,
    )
    per_layer = 3 * d * d + d * d + 2 * d * inner + inner + d + 2 * d
    matmul_params = layers * per_layer + 2 * d + d * vocab + vocab
    return 6.0 * matmul_params + 6.0 * layers * seq_len * d
