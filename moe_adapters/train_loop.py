"""The training loop: sample a task, step its adapter, evaluate, stop early, checkpoint, show progress."""

from __future__ import annotations

import time
from pathlib import Path

from moe_adapters.checkpoint import save_checkpoint
from moe_adapters.run_dir import CHECKPOINT_NAME
from moe_adapters.shared_phase import end_shared_phase, shared_phase_due
from moe_adapters.train_state import Trainer
from moe_adapters.train_step import flush_losses, record_eval, train_step


def run_training(trainer: Trainer, out_dir: Path, resume_sha: str, *, progress: bool = True) -> None:
    """The step loop with progress bar, periodic eval, early stopping and checkpoints."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tr = trainer.config.train
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    window_tokens, window_start = 0, time.perf_counter()
    console = Console(stderr=True)
    # Without a terminal (CI logs, `moea demo` subprocesses) a live bar shows nothing until the end:
    # print one plain line per log window instead.
    plain_lines = progress and not console.is_terminal
    with Progress(*columns, console=console, disable=not progress or plain_lines) as bar:
        bar_id = bar.add_task("train", total=tr.max_steps, completed=trainer.global_step, info="")
        while trainer.global_step < tr.max_steps and len(trainer.sampler) > 0:
            if shared_phase_due(trainer):
                message = end_shared_phase(trainer)
                if progress:
                    console.print(message, highlight=False)
            start = time.perf_counter()
            task, tokens = train_step(trainer)
            trainer.train_time_s += time.perf_counter() - start
            window_tokens += tokens
            expert = trainer.experts[trainer.expert_of_task[task]]
            if tr.eval_every and expert.steps % tr.eval_every == 0:
                record_eval(trainer, expert)
            step = trainer.global_step
            if tr.log_every and step % tr.log_every == 0 or step == tr.max_steps:
                loss = flush_losses(trainer)
                elapsed = max(1e-9, time.perf_counter() - window_start)
                info = f"task={task} loss={loss:.3f} {window_tokens / elapsed:,.0f} tok/s"
                bar.update(bar_id, completed=step, info=info)
                if plain_lines:
                    console.print(f"train step {step}/{tr.max_steps} {info}", highlight=False)
                window_tokens, window_start = 0, time.perf_counter()
            else:
                bar.update(bar_id, completed=step)
            if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.max_steps:
                save_checkpoint(trainer, out_dir / CHECKPOINT_NAME, resume_sha)
    flush_losses(trainer)
    for expert in trainer.experts.values():
        if expert.last_eval_step != expert.steps or expert.best_state is None:
            record_eval(trainer, expert)
