"""A training run: data, mesh, state, checkpoints, metrics and the step loop around trainer.py.

The run folder (`config.out`) holds everything needed to resume or export:

    train_config.json   the resolved TrainConfig
    tokenizer.json      the data's tokenizer (export ships it)
    checkpoints/<step>/ orbax: params, train (step, optimizer state, RNG), data (grain iterator)
    metrics.jsonl       one JSON object per logged step or evaluation
    tensorboard/        the same scalars for TensorBoard

Running the same command again resumes from the latest checkpoint: the same parameters,
optimizer moments, step and data position, so the losses continue exactly as without the stop.
Ctrl-C (SIGINT) asks the loop to stop after the current step; it saves a checkpoint and returns
(a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console

from codegen_repl.errors import ConfigError
from codegen_repl.train import trainer
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.data import TOKENIZER_FILE, PackedSource, make_loader, read_manifest
from codegen_repl.train.metrics import (
    MetricsWriter,
    mfu,
    peak_flops,
    progress_display,
    status_line,
)

CONFIG_FILE = "train_config.json"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class StopFlag:
    """Set by the SIGINT handler (or a test's hook); the loop checks it after every step."""

    reason: str | None = None

    def request(self, reason: str = "interrupted") -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps done in total
    interrupted: bool
    losses: list[tuple[int, float]]  # (step, mean loss since the previous log), this process
    eval_losses: list[tuple[int, float]]
    checkpoint: Path | None  # the folder of the last checkpoint saved


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when a multi-host launcher is present (a coordinator
    address, SLURM / Open MPI with more than one task, or a multi-host TPU slice). Call it before
    anything touches a device."""
    env = os.environ
    multi_host = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if multi_host:
        jax.distributed.initialize()
    return multi_host


@contextlib.contextmanager
def sigint_stops(flag: StopFlag) -> Iterator[None]:
    """While active, the first Ctrl-C requests a stop after this step; the second aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.request("interrupted")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------- setup


def resolve_config(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The config with seq_len taken from the data, checked against the data and the run folder."""
    if not config.data or not config.out:
        raise ConfigError("give --data (a `codegen-repl data build` folder) and --out (run folder)")
    manifest = read_manifest(Path(config.data))
    data_seq = int(manifest["seq_len"])
    if config.seq_len not in (0, data_seq):
        raise ConfigError(
            f"seq_len={config.seq_len} but the data was packed at {data_seq}; rebuild the data "
            f"with --seq-len {config.seq_len} or drop the override"
        )
    config = dataclasses.replace(config, seq_len=data_seq)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > config.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {vocab} ids but the model only {config.model.vocab_size} "
            f"embeddings; set model.vocab_size={vocab} (or more)"
        )
    eos = int(manifest["tokenizer"]["eos_token_id"])
    if config.init_from is None and config.model.eos_token_id != eos:
        # A new model's ids are the data tokenizer's: its config.json must name that EOS.
        model = dataclasses.replace(config.model, eos_token_id=eos, bos_token_id=eos)
        config = dataclasses.replace(config, model=model)
    saved = Path(config.out) / CONFIG_FILE
    if saved.exists():
        previous = TrainConfig.load(saved)
        if previous.model != config.model:
            raise ConfigError(
                f"{config.out} holds a run of a different model shape; use another --out"
            )
    return config, manifest


def prepare_out(config: TrainConfig) -> Path:
    out = Path(config.out)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / CONFIG_FILE)
        shutil.copy(Path(config.data) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return out


def checkpoint_manager(out: Path, config: TrainConfig) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager((out / CHECKPOINTS).absolute(), options=options)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )


def save_checkpoint(manager: Any, state: trainer.TrainState, iterator: Any) -> None:
    import grain
    import orbax.checkpoint as ocp

    train_part = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train_part),
            data=grain.checkpoint.CheckpointSave(iterator),
        ),
        force=True,
    )


def restore_checkpoint(
    manager: Any, step: int, abstract: trainer.TrainState, shardings: trainer.TrainState,
    iterator: Any,
) -> trainer.TrainState:  # fmt: skip
    """The state saved at `step`; the data iterator is moved to where it was."""
    import grain
    import orbax.checkpoint as ocp

    target = abstract_with_shardings(abstract, shardings)
    train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            train=ocp.args.StandardRestore(train_target),
            data=grain.checkpoint.CheckpointRestore(iterator),
        ),
    )
    train_part = restored["train"]
    return trainer.TrainState(
        step=train_part["step"],
        params=restored["params"],
        opt_state=train_part["opt_state"],
        rng=train_part["rng"],
    )


def initial_state(config: TrainConfig, functions: trainer.Compiled) -> trainer.TrainState:
    """Random params, or the `init_from` checkpoint's (fine-tuning), placed on the mesh."""
    if config.init_from is None:
        return functions.init()
    from codegen_repl.model.checkpoint import load_model

    loaded = load_model(config.init_from, dtype="float32")
    if dataclasses.replace(loaded.config, hub_id=None) != dataclasses.replace(
        config.model, hub_id=None
    ):
        raise ConfigError(
            f"{config.init_from} does not have this run's model shape; with --init-from the "
            "model comes from the checkpoint, so drop model.* overrides and --preset"
        )
    params = jax.device_put(loaded.params, functions.shardings.params)
    tx = trainer.make_optimizer(config)
    init = jax.jit(lambda p: trainer.init_state(config, tx, p), out_shardings=functions.shardings)
    return init(params)


# --------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """What the step loop needs, built once."""

    config: TrainConfig
    out: Path
    mesh: Any
    functions: trainer.Compiled
    iterator: Any
    manager: Any
    writer: MetricsWriter
    console: Console
    flops_per_token: float
    peak: float | None


def train(
    config: TrainConfig,
    console: Console | None = None,
    stop: StopFlag | None = None,
    on_step: Callable[[int, StopFlag], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train (or resume) the run described by `config`; see the module docstring.

    `on_step(step, stop)` is called after every optimizer step; a test stops a run exactly as
    Ctrl-C does by calling `stop.request()` there.
    """
    console = console or Console(stderr=True)
    stop = stop or StopFlag()
    config, _ = resolve_config(config)
    out = prepare_out(config)
    console.print(f"[bold]training config[/bold] {config.to_json()}", highlight=False)
    run = _build_run(config, out, console)
    try:
        state = _start_state(run)
        with sigint_stops(stop):
            return _loop(run, state, stop, on_step, clock)
    finally:
        run.manager.wait_until_finished()
        run.manager.close()
        run.writer.close()


def _start_state(run: _Run) -> trainer.TrainState:
    """The latest checkpoint's state (and data position), else a fresh or fine-tuning start."""
    latest = run.manager.latest_step()
    if latest is None:
        return initial_state(run.config, run.functions)
    functions = run.functions
    state = restore_checkpoint(
        run.manager, latest, functions.abstract, functions.shardings, run.iterator
    )
    run.console.print(f"resumed from {run.out / CHECKPOINTS / str(latest)} (step {latest})")
    return state


def _build_run(config: TrainConfig, out: Path, console: Console) -> _Run:
    mesh = trainer.training_mesh(config)
    functions = trainer.compiled(config, mesh)
    processes = jax.process_count()
    if config.batch_size % processes:
        raise ConfigError(f"batch_size must be a multiple of the {processes} processes")
    loader = make_loader(
        PackedSource(Path(config.data), "train"),
        config.batch_size // processes,
        seed=config.seed,
        worker_count=config.loader_workers,
    )
    return _Run(
        config=config,
        out=out,
        mesh=mesh,
        functions=functions,
        iterator=iter(loader),
        manager=checkpoint_manager(out, config),
        writer=MetricsWriter(out, enabled=jax.process_index() == 0),
        console=console,
        flops_per_token=trainer.flops_per_token(config, config.seq_len),
        peak=peak_flops(override_tflops=config.peak_tflops),
    )


def global_batch(run: _Run, rows: np.ndarray) -> jax.Array:
    """This process's rows [batch / processes, seq] -> the global [grad_accum, micro, seq]."""
    config = run.config
    local = rows.reshape(config.grad_accum, -1, rows.shape[-1])
    sharding = trainer.batch_sharding(run.mesh)
    return jax.make_array_from_process_local_data(sharding, local)


@dataclasses.dataclass
class _Meter:
    """Training throughput between sync points, leaving out compilation, eval and saving."""

    clock: Callable[[], float]
    step: int
    started: float = 0.0

    def reset(self, step: int) -> None:
        self.step, self.started = step, self.clock()

    def steps_per_second(self, step: int) -> float | None:
        """Since the last reset; call after a sync (fetching metrics) so the time is real."""
        if step == self.step:
            return None
        return (step - self.step) / max(self.clock() - self.started, 1e-9)


def _loop(
    run: _Run,
    state: trainer.TrainState,
    stop: StopFlag,
    on_step: Callable[[int, StopFlag], None] | None,
    clock: Callable[[], float],
) -> TrainResult:
    config = run.config
    step = first = int(state.step)
    losses: list[tuple[int, float]] = []
    eval_losses: list[tuple[int, float]] = []
    pending: list[dict] = []  # device metrics since the last log (fetching syncs the device)
    saved: Path | None = None
    meter = _Meter(clock, step)
    with progress_display(run.console) as progress:
        task = progress.add_task("train", total=config.steps, completed=step, status="compiling")
        while step < config.steps:
            state, metrics = run.functions.train_step(state, global_batch(run, next(run.iterator)))
            step += 1
            pending.append(metrics)
            if step == first + 1:  # this process's first step compiles: not throughput
                jax.block_until_ready(metrics)
                meter.reset(step)
            if on_step is not None:
                on_step(step, stop)
            if step % config.log_every == 0 or step == config.steps or stop.requested:
                loss, line = _log(run, step, pending, meter)
                losses.append((step, loss))
                progress.update(task, completed=step, status=line)
                pending = []
            if _due(step, config.eval_every):
                eval_losses.append((step, evaluate(run, state.params, step)))
                meter.reset(step)
            if stop.requested or step == config.steps or _due(step, config.save_every):
                save_checkpoint(run.manager, state, run.iterator)
                saved = run.out / CHECKPOINTS / str(step)
                meter.reset(step)
            if stop.requested:
                break
    return TrainResult(step, stop.requested, losses, eval_losses, saved)


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def _log(run: _Run, step: int, pending: list[dict], meter: _Meter) -> tuple[float, str]:
    """Write the mean metrics of the steps since the last log; return the loss and a status."""
    fetched = jax.device_get(pending)
    loss = float(np.mean([m["loss"] for m in fetched]))
    rate = meter.steps_per_second(step)
    meter.reset(step)
    tokens_per_second = rate * run.config.batch_size * run.config.seq_len if rate else None
    utilization = None
    if tokens_per_second is not None:
        utilization = mfu(tokens_per_second, run.flops_per_token, run.peak, jax.device_count())
    values = {
        "loss": loss,
        "grad_norm": float(fetched[-1]["grad_norm"]),
        "lr": float(fetched[-1]["lr"]),
        "tokens_per_second": tokens_per_second,
        "mfu": utilization,
    }
    run.writer.write(step, values)
    return loss, status_line(loss, tokens_per_second, utilization)


def evaluate(run: _Run, params: trainer.Params, step: int) -> float:
    """Mean loss over the first `eval_batches` batches of the validation split (same ones each
    time: no shuffle)."""
    config = run.config
    try:
        source = PackedSource(Path(config.data), "val")
    except ConfigError:
        return float("nan")  # the data has no validation split (val_fraction 0)
    per_process = config.micro_batch // jax.process_count()
    if len(source) < config.micro_batch:
        return float("nan")
    loader = make_loader(source, per_process, seed=config.seed, shuffle=False, num_epochs=1)
    sharding = trainer.eval_batch_sharding(run.mesh)
    total, count = 0.0, 0
    for index, rows in enumerate(loader):
        if index == config.eval_batches:
            break
        batch = jax.make_array_from_process_local_data(sharding, rows)
        loss_sum, targets = jax.device_get(run.functions.eval_step(params, batch))
        total, count = total + float(loss_sum), count + int(targets)
    value = total / max(count, 1)
    run.writer.write(step, {"loss": value}, prefix="eval")
    return value
