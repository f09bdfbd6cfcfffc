"""Data-parallel training under `accelerate launch` (2 CPU processes, gloo) and QLoRA (train.quantize=4bit).

The DDP test runs the real `moea train` command through `accelerate launch --cpu --num_processes 2` on the
tiny test mixture. Each rank writes a digest of the adapters it holds at the end through the test-only hook
``MOEA_TEST_ONLY_RANK_DIGESTS``; both ranks must agree, rank 0's saved adapters must hash to the same
digests, and the optimizer steps must be ``train.max_steps``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_adapters.parallel import TEST_DIGEST_ENV, Parallel, ParallelError, adapter_digest, detect_parallel
from moe_adapters.quantize import QuantizeError, check_quantize_backend
from moe_adapters.train import train_mixture

FIXTURES = Path(__file__).parent / "fixtures"
MIXTURE = FIXTURES / "mixture.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_has_no_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = detect_parallel()
    assert (parallel.rank, parallel.world_size, parallel.is_main, parallel.active) == (0, 1, True, False)
    loss = torch.tensor(2.5)
    assert parallel.average_gradients([], loss) is loss
    assert parallel.gather_objects("x") == ["x"]


def test_deepspeed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ParallelError, match="^DeepSpeed is not supported by moea train") as error:
        detect_parallel()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "parameter offload is not supported"),
        ({"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "use a plain multi-process accelerate config"),
        ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "FULL_SHARD or SHARD_GRAD_OP"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "train.gradient_checkpointing=true"),
    ],
)
def test_fsdp_settings_moea_does_not_implement_are_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ParallelError, match=message) as error:
        detect_parallel()  # before any process group is set up
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("env", "reshard"),
    [
        ({}, True),
        ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False),
        ({"FSDP_SHARDING_STRATEGY": "1"}, True),  # accelerate's FSDP1 numbering
        ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, False),
        ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "false"}, True),  # a v2-only key
    ],
)
def test_fsdp_settings_from_an_accelerate_config(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reshard: bool
) -> None:
    from moe_adapters.fsdp import fsdp_settings_from_env

    for key in ("FSDP_SHARDING_STRATEGY", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(key, raising=False)
    assert fsdp_settings_from_env() is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = fsdp_settings_from_env()
    assert settings is not None and settings.reshard_after_forward is reshard


def test_adapter_digest_sees_every_byte() -> None:
    state = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.ones(3, 2)}
    same = {k: v.clone() for k, v in reversed(state.items())}
    assert adapter_digest(state) == adapter_digest(same)
    same["a.lora_A.weight"][1, 2] = 1e-30
    assert adapter_digest(state) != adapter_digest(same)


def test_quantize_none_needs_nothing() -> None:
    check_quantize_backend("none", torch.device("cpu"))


def test_quantize_without_bitsandbytes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection (bitsandbytes is installed here): a None entry makes `import bitsandbytes` fail.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(
        QuantizeError, match=r"^train.quantize=4bit needs bitsandbytes .*pip install"
    ) as error:
        check_quantize_backend("4bit", torch.device("cpu"))
    assert "\n" not in str(error.value)


def test_quantize_at_config_load_refused_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # fault injection, as above
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(QuantizeError, match="needs bitsandbytes"):
        train_mixture(MIXTURE, tmp_path / "run", overrides={"train.quantize": "4bit"}, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tmp_path: Path) -> None:
    """bitsandbytes' CPU backend quantizes to NF4 here, so QLoRA is tested for real on the CPU."""
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train_mixture(
            MIXTURE,
            tmp_path / "run",
            overrides={
                "train.num_threads": 1,
                "train.max_steps": 4,
                "train.quantize": "4bit",
                "train.lr": 1e-3,
            },
            progress=False,
        )
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(e["steps"] for e in metrics["experts"].values()) == 4
    assert "quantize: 4bit" in (out / "mixture.yaml").read_text()
    for task in ("sentiment", "arithmetic"):
        weights = load_file(out / "experts" / task / "adapter_model.safetensors")
        # Ordinary PEFT keys and fp32 LoRA weights: the adapter loads on the unquantized base.
        assert weights and all(".lora_" in k and "base_layer" not in k for k in weights)
        assert all(v.dtype == torch.float32 for v in weights.values())
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), f"{task} did not train"


MAX_STEPS = 8


def _launch_command(out: Path, port: int) -> list[str]:
    """`moea train` on 2 CPU ranks through accelerate (checkpoint at step 4 of 8, the end of the shared
    warm-up; keep-if-better; uneven validation)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # accelerate's --cpu starts one process (its multi-CPU path is mpirun): the torchrun launcher of
        # --multi_gpu starts two, and ACCELERATE_USE_CPU makes them CPU processes with the gloo backend.
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "serving.cli_root",
        "train",
        str(MIXTURE),
        "--out",
        str(out),
        "--set",
        "train.num_threads=1",
        "--set",
        f"train.max_steps={MAX_STEPS}",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.checkpoint_every=4",
        # 9 validation rows per task: the ranks evaluate 5 and 4 rows, 2 and 1 batches (FSDP must still run
        # as many forwards on each rank: moe_adapters.fsdp.equal_forward_counts).
        # The shared warm-up recipe with keep-if-better: its end-of-run evaluations are collective.
        "--set",
        "train.shared_steps=4",
        "--set",
        "train.keep_if_better=true",
        "--set",
        "splits.train=0.7875",
        "--set",
        "splits.val=0.1125",
    ]


def _launch_env(digests: Path) -> dict[str, str]:
    return {
        **os.environ,
        TEST_DIGEST_ENV: str(digests),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _rank_digests(digests: Path) -> list[dict]:
    return [json.loads((digests / f"rank{r}.json").read_text()) for r in range(2)]


def _kill_run(out: Path) -> None:
    """SIGKILL the launcher and both ranks of the run writing ``out`` (torchrun starts each rank in a
    session of its own, so a process-group kill would miss them): the processes this test started."""
    marker = str(out).encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """(run dir, each rank's digests) of one DDP launch on 2 CPU ranks, shared by the DDP and FSDP tests."""
    root = tmp_path_factory.mktemp("ddp")
    out, digests = root / "run", root / "digests"
    start = time.perf_counter()
    result = subprocess.run(
        _launch_command(out, _free_port()),
        env=_launch_env(digests),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )
    wall_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"DDP 2 CPU ranks, {MAX_STEPS} steps: {wall_s:.1f} s wall")
    return out, _rank_digests(digests)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_ranks_end_equal_and_resume_exactly(
    tmp_path: Path, ddp_run: tuple[Path, list[dict]]
) -> None:
    out, ranks = ddp_run
    assert ranks[0] == ranks[1], "the ranks ended with different adapters or step counts"
    assert ranks[0]["world_size"] == 2 and ranks[0]["global_step"] == MAX_STEPS
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(e["steps"] for e in metrics["experts"].values()) == MAX_STEPS
    assert metrics["train"]["steps"] == MAX_STEPS
    served = set(metrics["recipe"]["serving"].values())
    assert metrics["recipe"]["shared_steps_taken"] == 4 and set(metrics["recipe"]["decisions"]) == {
        "sentiment",
        "arithmetic",
    }
    for name, expert in ranks[0]["experts"].items():
        folder = out / ("experts" if name in served else "candidates") / name
        saved = load_file(folder / "adapter_model.safetensors")
        assert adapter_digest(saved) == expert["sha256"], f"rank 0 saved other weights for {name}"
        assert metrics["experts"][name]["steps"] == expert["steps"]
    assert (out / "run.json").is_file() and not (out / "checkpoint.pt").exists()

    # Killed after the step-4 checkpoint and resumed: the same adapters, bit for bit.
    killed, killed_digests = tmp_path / "killed", tmp_path / "killed-digests"
    command, env = _launch_command(killed, _free_port()), _launch_env(killed_digests)
    proc = subprocess.Popen(
        command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 600
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, "the launch exited before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
    finally:
        _kill_run(killed)
        proc.wait()
    assert not (killed / "run.json").exists() and not killed_digests.exists()
    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _rank_digests(killed_digests) == ranks


def test_parallel_defaults_are_one_process() -> None:
    assert Parallel().world_size == 1 and Parallel().is_main


def test_unknown_quantize_value_is_a_config_error() -> None:
    from moe_adapters.config import ConfigError
    from moe_adapters.config_load import load_mixture

    with pytest.raises(ConfigError, match=r"train.quantize: '8bit' is not one of \['none', '4bit'\]"):
        load_mixture(MIXTURE, {"train.quantize": "8bit"})
    assert load_mixture(MIXTURE).train.quantize == "none"


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""


@pytest.mark.slow
def test_fsdp_accelerate_config_file_trains_the_ddp_adapters(
    tmp_path: Path, ddp_run: tuple[Path, list[dict]]
) -> None:
    """`accelerate launch --config_file fsdp.yaml` (FSDP2, FULL_SHARD, 2 CPU ranks): the base's decoder
    layers are sharded, and the run ends with exactly the adapters, step counts and validation losses of the
    DDP run (the adapters are not sharded and the sharded weights are gathered exactly for each forward).
    With cpu_ram_efficient_loading (accelerate's default) transformers loads the base on rank 0 only and
    zeros elsewhere: moea sends rank 0's weights first (without that, rank 1 trained on zeros)."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    out, digests = tmp_path / "run", tmp_path / "digests"
    ddp_launch = _launch_command(out, _free_port())
    train_args = ddp_launch[ddp_launch.index("-m", 3) :]  # `-m serving.cli_root train …`
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(_free_port()), *train_args]  # fmt: skip
    env = {k: v for k, v in _launch_env(digests).items() if k != "ACCELERATE_USE_CPU"}  # the file says so
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "FSDP: 30 decoder layers sharded over 2 ranks (FULL_SHARD)" in result.stderr

    ddp_out, ddp_ranks = ddp_run
    assert _rank_digests(digests) == ddp_ranks
    fsdp_metrics = json.loads((out / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp_out / "metrics.json").read_text())
    for name, expert in ddp_metrics["experts"].items():
        assert (fsdp_metrics["experts"][name]["steps"], fsdp_metrics["experts"][name]["best_val_loss"]) == (
            expert["steps"],
            expert["best_val_loss"],
        )
    assert fsdp_metrics["recipe"] == ddp_metrics["recipe"]  # keep-if-better decided on the same losses
    assert (out / "run.json").is_file()
