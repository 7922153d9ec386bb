"""The launch scripts, run for real with fake `gcloud`/`srun`/`sbatch` on PATH.

The fakes are small programs that append their argv to a JSON-lines file and answer from a
script of canned responses. In --dry-run they must never be called: dry-run only prints."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu_node.sh", "gpu_slurm.sh", "slurm_train.sbatch"]
ALL_SHELL_FILES = SCRIPTS + ["common.sh"]

# Answers by call kind: each kind holds a list of [stdout, exit code] used in order (the
# last one repeats). A call in "forbid" mode marks the test as failed.
FAKE = r'''#!{python}
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_DIR"])
argv = [Path(sys.argv[0]).name] + sys.argv[1:]
if os.environ.get("FAKE_MODE") == "forbid":
    (state / "forbidden").write_text(json.dumps(argv))
    sys.exit(97)
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")
joined = " ".join(argv)
if argv[0] == "sbatch":
    kind = "sbatch"
elif " describe " in joined and "--format=" in joined:
    kind = "state"
elif " tpu-vm ssh " in joined:
    kind = "ssh"
elif argv[:3] == ["gcloud", "storage", "ls"]:
    kind = "storage-ls"
else:
    kind = "other"
responses = json.loads((state / "responses.json").read_text()) if (state / "responses.json").exists() else {{}}
queue = responses.get(kind) or [["", 0]]
out, rc = queue.pop(0) if len(queue) > 1 else queue[0]
(state / "responses.json").write_text(json.dumps(responses))
if out:
    print(out)
if rc and kind == "state":
    print("ERROR: (gcloud) NOT_FOUND: resource not found", file=sys.stderr)
sys.exit(rc)
'''

TPU_ENV = {
    "OPENCHAT_ZONE": "us-east5-a",
    "OPENCHAT_TPU_NAME": "oc-13b",
    "OPENCHAT_ACCELERATOR_TYPE": "v5p-64",
    "OPENCHAT_CONFIG": "configs/llama2_13b_openchat.py",
    "OPENCHAT_WORKDIR": "gs://bucket/runs/13b",
    "OPENCHAT_DATASET_DIR": "gs://bucket/data/openchat",
}


class Harness:
    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "fake"
        self.bin = self.dir / "bin"
        self.bin.mkdir(parents=True)
        for name in ("gcloud", "srun", "sbatch"):
            path = self.bin / name
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()

    def respond(self, **kinds: list[list]) -> None:
        (self.dir / "responses.json").write_text(json.dumps({k.replace("_", "-"): v for k, v in kinds.items()}))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def run(self, script: str, *args: str, env: dict | None = None, dry: bool = False,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCHAT_", "SLURM_"))}
        full_env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(self.dir),
                        TMPDIR=str(self.tmp))
        if dry:
            full_env["FAKE_MODE"] = "forbid"
        full_env.update(env or {})
        script_path = script if "/" in script else str(LAUNCH / script)
        proc = subprocess.run([script_path, *args], env=full_env, capture_output=True, text=True,
                              cwd=cwd or REPO, timeout=60)
        if dry:
            assert not (self.dir / "forbidden").exists(), (
                f"--dry-run called {(self.dir / 'forbidden').read_text()}")
        return proc

    def dry(self, script: str, *args: str, env: dict | None = None) -> list[list[str]]:
        """Run with --dry-run, check it succeeded and called nothing; the printed commands as argv lists."""
        args = list(args)
        args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
        proc = self.run(script, *args, env=env, dry=True)
        assert proc.returncode == 0, proc.stderr
        assert self.calls() == []
        return [shlex.split(line) for line in proc.stdout.splitlines()]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def option(argv: list[str], name: str) -> str:
    """The value of `name=value` in argv (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def is_ssh(argv: list[str]) -> bool:
    return argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def remote_train_args(ssh_argv: list[str]) -> list[str]:
    """The argv after `openchat-jax` in the remote command of a train ssh."""
    remote = shlex.split(option(ssh_argv, "--command"))
    i = next(i for i, w in enumerate(remote) if w.endswith("bin/openchat-jax"))
    return remote[i + 1 :]


EXPECTED_TRAIN = [
    "train", "--config", "configs/llama2_13b_openchat.py",
    "--config.workdir=gs://bucket/runs/13b", "--config.data.dataset_dir=gs://bucket/data/openchat",
]


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("name", ALL_SHELL_FILES)
def test_bash_syntax(name: str) -> None:
    proc = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *(f"launch/{n}" for n in ALL_SHELL_FILES)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable_and_strict(name: str) -> None:
    path = LAUNCH / name
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("name,first", [("tpu_pod.sh", None), ("tpu_pod.sh", "train"), ("gpu_node.sh", None),
                                        ("gpu_node.sh", "train"), ("gpu_slurm.sh", None),
                                        ("gpu_slurm.sh", "submit"), ("slurm_train.sbatch", None)])
def test_help_exits_zero_and_prints_usage(h: Harness, name: str, first: str | None) -> None:
    proc = h.run(name, *([first] if first else []), "--help", dry=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:")
    assert "--dry-run" in proc.stdout


@pytest.mark.parametrize("name", ["tpu_pod.sh", "gpu_node.sh", "gpu_slurm.sh"])
def test_no_command_prints_usage_and_fails(h: Harness, name: str) -> None:
    proc = h.run(name, dry=True)
    assert proc.returncode == 2
    assert "Usage:" in proc.stderr


@pytest.mark.parametrize("script,args,env,message", [
    ("tpu_pod.sh", ["train"], {**TPU_ENV, "OPENCHAT_WORKDIR": ""}, "missing required option --workdir (or set OPENCHAT_WORKDIR)"),
    ("tpu_pod.sh", ["train"], {**TPU_ENV, "OPENCHAT_ZONE": ""}, "missing required option --zone"),
    ("tpu_pod.sh", ["train"], {**TPU_ENV, "OPENCHAT_CONFIG": ""}, "missing required option --config"),
    ("tpu_pod.sh", ["create"], {**TPU_ENV, "OPENCHAT_ACCELERATOR_TYPE": ""}, "missing required option --accelerator-type"),
    ("tpu_pod.sh", ["export"], TPU_ENV, "missing required option --hf-out"),
    ("tpu_pod.sh", ["import-base", "--hf-dir", "gs://b/hf"], TPU_ENV, "missing required option --init-from"),
    ("tpu_pod.sh", ["train", "--workdir", "/local/run"], TPU_ENV, "--workdir must be a gs:// path"),
    ("tpu_pod.sh", ["create", "--queued", "--preemptible"], TPU_ENV, "--preemptible is for plain TPU VMs"),
    ("tpu_pod.sh", ["create", "--accelerator-type", "v9x-8"], TPU_ENV, "no default runtime version"),
    ("tpu_pod.sh", ["train", "--zone"], TPU_ENV, "option --zone needs a value"),
    ("tpu_pod.sh", ["train", "--bogus"], TPU_ENV, "unknown option '--bogus'"),
    ("tpu_pod.sh", ["launch"], TPU_ENV, "unknown command 'launch'"),
    ("tpu_pod.sh", ["resume", "--max-attempts", "x"], TPU_ENV, "--max-attempts must be a non-negative integer"),
    ("tpu_pod.sh", ["install", "--remote-dir", "/etc"], TPU_ENV, "--remote-dir must be a plain path"),
    ("tpu_pod.sh", ["train", "--env", "no-equals"], TPU_ENV, "--env takes KEY=VALUE"),
    ("gpu_node.sh", ["train", "--config", "c.py", "--workdir", "/r"], {}, "missing required option --dataset-dir"),
    ("gpu_node.sh", ["train", "--config", "c.py", "--workdir", "/r", "--dataset-dir", "/d", "--gpus", "0;1"], {},
     "--gpus must be a comma-separated list"),
    ("gpu_slurm.sh", ["submit", "--config", "c.py", "--workdir", "/r", "--dataset-dir", "/d"], {},
     "missing required option --nodes (or set OPENCHAT_SLURM_NODES)"),
    ("gpu_slurm.sh", ["submit", "--nodes", "2", "--procs", "per-core", "--config", "c.py", "--workdir", "/r",
                      "--dataset-dir", "/d"], {}, "--procs must be per-gpu or per-node"),
    ("slurm_train.sbatch", ["--workdir", "/r", "--dataset-dir", "/d"], {}, "missing required option --config"),
])
def test_bad_options_fail_with_a_clear_message(h: Harness, script, args, env, message) -> None:
    proc = h.run(script, *args, "--dry-run", env=env, dry=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert f"{script}: error:" in proc.stderr
    assert proc.stdout == ""


NAME_MISMATCHES = [
    (["{command} resume"], "unknown command '{command} resume'"),
    (["--help=1"], "unknown command '--help=1'"),
    (["{command}", "--dry-run=1"], "option --dry-run takes no value"),
    (["{command}", "--help=1"], "option --help takes no value"),
    (["{command}", "--config --workdir", "c.py"], "unknown option '--config --workdir'"),
    (["{command}", "--config", "--dry-run"], "option --config needs a value, got option '--dry-run'"),
]


@pytest.mark.parametrize("script,command,args,message", [
    (script, command, args, message)
    for script, command in [("tpu_pod.sh", "train"), ("gpu_node.sh", "train"), ("gpu_slurm.sh", "submit"),
                            ("slurm_train.sbatch", None)]
    for args, message in NAME_MISMATCHES
    if command is not None or args[0] == "{command}"  # slurm_train.sbatch takes options only
])
def test_command_word_and_option_names_match_exactly(h: Harness, script, command, args, message) -> None:
    if command is None:
        args = args[1:]
    args = [a.format(command=command) for a in args]
    proc = h.run(script, *args, dry=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(command=command) in proc.stderr
    assert proc.stdout == ""


def test_quote_round_trips_through_bash(tmp_path: Path) -> None:
    tricky = ["plain", "", "two words", "it's", 'say "hi"', "$HOME", "a\\b", "--config.x=[1, 2]", "~/x",
              "tab\there", "new\nline", "*", "semi;colon", "-"]
    script = tmp_path / "q.sh"
    script.write_text(f'source {shlex.quote(str(LAUNCH / "common.sh"))}\noc_quote_cmd "$@"\n')
    quoted = subprocess.run(["bash", str(script), *tricky], capture_output=True, text=True, check=True).stdout
    assert shlex.split(quoted) == tricky
    back = subprocess.run(["bash", "-c", f'for a in {quoted}; do printf "%s\\0" "$a"; done'],
                          capture_output=True, text=True, check=True).stdout
    assert back.split("\0")[:-1] == tricky


# ---------------------------------------------------------------- TPU pod slices


def test_tpu_train_runs_one_command_on_all_workers(h: Harness) -> None:
    cmds = h.dry("tpu_pod.sh", "train", "--init-from", "gs://bucket/llama2-13b-jax", "--",
                 "--config.train.epochs=1", env=TPU_ENV)
    assert len(cmds) == 1
    ssh = cmds[0]
    assert is_ssh(ssh) and ssh[5] == "oc-13b"
    assert "--zone=us-east5-a" in ssh
    assert ssh.count("--worker=all") == 1 and not any(a.startswith("--worker=") and a != "--worker=all" for a in ssh)
    assert remote_train_args(ssh) == EXPECTED_TRAIN + ["--config.init_from=gs://bucket/llama2-13b-jax",
                                                       "--config.train.epochs=1"]
    remote = option(ssh, "--command")
    assert remote.startswith("cd ~/openchat-jax && ~/openchat-venv/bin/openchat-jax train ")


def test_tpu_dry_run_prints_exactly_what_runs(h: Harness) -> None:
    args = ["train", "--project", "my proj", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=1", "--",
            "--config.name=it's \"quoted\"", "--config.lr=3e-4"]
    printed = h.dry("tpu_pod.sh", *args, env=TPU_ENV)
    proc = h.run("tpu_pod.sh", *args, env=TPU_ENV)
    assert proc.returncode == 0, proc.stderr
    assert h.calls() == printed
    remote = shlex.split(option(printed[0], "--command"))
    assert "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=1" in remote
    assert remote[-2:] == ["--config.name=it's \"quoted\"", "--config.lr=3e-4"]
    assert "--project=my proj" in printed[0]


def test_tpu_copy_data_to_local_disk_on_every_worker(h: Harness) -> None:
    (ssh,) = h.dry("tpu_pod.sh", "train", "--copy-data-to", "/tmp/openchat-data", env=TPU_ENV)
    remote = option(ssh, "--command")
    assert remote.startswith("mkdir -p /tmp/openchat-data && gcloud storage rsync --recursive "
                             "gs://bucket/data/openchat /tmp/openchat-data && cd ")
    assert "--config.data.dataset_dir=/tmp/openchat-data" in remote_train_args(ssh)
    assert "--worker=all" in ssh


@pytest.mark.parametrize("flags,want_cmd,want_flags", [
    ([], ["tpu-vm", "create"], ["--version=v2-alpha-tpuv5"]),
    (["--spot"], ["tpu-vm", "create"], ["--spot"]),
    (["--preemptible"], ["tpu-vm", "create"], ["--preemptible"]),
    (["--queued", "--spot", "--valid-until", "6h"], ["queued-resources", "create"],
     ["--node-id=oc-13b", "--runtime-version=v2-alpha-tpuv5", "--spot", "--valid-until-duration=6h"]),
    (["--queued", "--reserved", "--accelerator-type", "v4-64"], ["queued-resources", "create"],
     ["--runtime-version=tpu-ubuntu2204-base", "--reserved", "--accelerator-type=v4-64"]),
    (["--runtime-version", "custom-rt", "--create-arg=--network=my-net"], ["tpu-vm", "create"],
     ["--version=custom-rt", "--network=my-net"]),
])
def test_tpu_create(h: Harness, flags, want_cmd, want_flags) -> None:
    cmds = h.dry("tpu_pod.sh", "create", *flags, env=TPU_ENV)
    create = cmds[0]
    assert create[:5] == ["gcloud", "compute", "tpus", *want_cmd] and create[5] == "oc-13b"
    for flag in want_flags:
        assert flag in create
    if "--accelerator-type" not in flags:
        assert "--accelerator-type=v5p-64" in create
    provisioning = {"--spot", "--preemptible", "--reserved"} & set(create)
    assert len(provisioning) == (0 if not flags or flags[0] == "--runtime-version" else 1)
    if "--queued" in flags:  # then waits for ACTIVE
        assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
        assert option(cmds[1], "--format") == "value(state.state)"


def test_tpu_install_ships_this_checkout_to_all_workers(h: Harness) -> None:
    cmds = h.dry("tpu_pod.sh", "install", env=TPU_ENV)
    archive, scp, rm, ssh = cmds
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = option(archive, "--output")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, "oc-13b:openchat-jax-src.tar.gz"] and "--worker=all" in scp
    assert rm == ["rm", "-f", tarball]
    assert is_ssh(ssh) and "--worker=all" in ssh
    steps = option(ssh, "--command").split(" && ")
    assert "tar -xzf ~/openchat-jax-src.tar.gz -C ~/openchat-jax" in steps
    assert "uv venv --allow-existing --python 3.11 ~/openchat-venv" in steps
    assert "uv pip install --python ~/openchat-venv/bin/python 'jax[tpu]>=0.7,<0.11'" in steps
    assert "uv pip install --python ~/openchat-venv/bin/python ~/openchat-jax" in steps
    # jax[tpu] goes in before the package, so pip keeps the TPU build.
    assert steps.index("uv pip install --python ~/openchat-venv/bin/python 'jax[tpu]>=0.7,<0.11'") < steps.index(
        "uv pip install --python ~/openchat-venv/bin/python ~/openchat-jax")


def test_tpu_install_from_git(h: Harness) -> None:
    (ssh,) = h.dry("tpu_pod.sh", "install", "--git-url", "https://github.com/me/openchat-jax.git", "--ref", "v0.1.0",
                   "--jax-spec", "jax[tpu]==0.10.2", "--python-version", "3.12", env=TPU_ENV)
    assert "--worker=all" in ssh
    remote = option(ssh, "--command")
    assert ("git clone --quiet https://github.com/me/openchat-jax.git ~/openchat-jax && "
            "git -C ~/openchat-jax checkout --quiet v0.1.0") in remote
    assert "'jax[tpu]==0.10.2'" in remote and "--python 3.12" in remote


def test_tpu_resume_dry_run_reruns_the_same_train_command(h: Harness) -> None:
    (train,) = h.dry("tpu_pod.sh", "train", env=TPU_ENV)
    cmds = h.dry("tpu_pod.sh", "resume", "--queued", env=TPU_ENV)
    describe, stop, train_again, check = cmds
    assert describe[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
    assert is_ssh(stop) and "--worker=all" in stop and "pkill -TERM -f" in option(stop, "--command")
    assert train_again == train
    assert check == ["gcloud", "storage", "ls", "gs://bucket/runs/13b/final"]


def test_tpu_resume_recreate_dry_run(h: Harness) -> None:
    cmds = h.dry("tpu_pod.sh", "resume", "--queued", "--spot", "--recreate", env=TPU_ENV)
    words = [" ".join(c[:5]) for c in cmds]
    assert words[:3] == ["gcloud compute tpus queued-resources delete", "gcloud compute tpus queued-resources create",
                         "gcloud compute tpus queued-resources describe"]
    assert "--force" in cmds[0] and "--spot" in cmds[1]
    assert cmds[3][:4] == ["git", "-C", str(REPO), "archive"]  # reinstall on the new VM
    assert is_ssh(cmds[-2]) and remote_train_args(cmds[-2]) == EXPECTED_TRAIN
    assert cmds[-1][:3] == ["gcloud", "storage", "ls"]


def test_tpu_resume_recovers_a_preempted_queued_resource(h: Harness) -> None:
    """Not a dry run: the fake gcloud says the slice is SUSPENDED (preempted), then makes it wait
    for capacity, then the first train run dies (preemption); the second attempt finishes."""
    h.respond(
        state=[["SUSPENDED", 0], ["WAITING_FOR_RESOURCES", 0], ["ACTIVE", 0], ["ACTIVE", 0]],
        ssh=[["", 0], ["", 255], ["", 0], ["", 0]],  # install, train (dies), stop, train
        storage_ls=[["gs://bucket/runs/13b/final/", 0]],
    )
    proc = h.run("tpu_pod.sh", "resume", "--queued", "--spot", "--git-url", "https://example.com/oc.git",
                 "--max-attempts", "2", "--retry-delay", "0", "--poll-interval", "1", env=TPU_ENV)
    assert proc.returncode == 0, proc.stderr
    calls = h.calls()
    kinds = []
    for c in calls:
        if is_ssh(c):
            remote = option(c, "--command")
            kinds.append("install" if "uv venv" in remote else "stop" if "pkill" in remote else "train")
        else:
            kinds.append(" ".join(c[3:5]) if c[1] == "compute" else " ".join(c[:3]))
    assert kinds == [
        "queued-resources describe",  # SUSPENDED
        "queued-resources delete", "queued-resources create",
        "queued-resources describe", "queued-resources describe",  # waiting, then ACTIVE
        "install", "train",  # train dies
        "queued-resources describe",  # ACTIVE: no recreate, no reinstall
        "stop", "train", "gcloud storage ls",
    ]
    trains = [c for c, k in zip(calls, kinds) if k == "train"]
    assert trains[0] == trains[1] and "--worker=all" in trains[0]
    assert remote_train_args(trains[0]) == EXPECTED_TRAIN
    assert "--spot" in calls[2] and "--force" in calls[1]
    assert "training finished: gs://bucket/runs/13b/final" in proc.stderr


def test_tpu_resume_gives_up_after_max_attempts(h: Harness) -> None:
    h.respond(state=[["READY", 0]], ssh=[["", 0], ["", 1]])
    proc = h.run("tpu_pod.sh", "resume", "--max-attempts", "1", env=TPU_ENV)
    assert proc.returncode == 2
    assert "training did not finish (train exit 1, attempt 1 of 1); run resume again" in proc.stderr
    assert [c[:5] for c in h.calls() if not is_ssh(c)] == [["gcloud", "compute", "tpus", "tpu-vm", "describe"]]


def test_tpu_resume_clean_exit_without_final_retries(h: Harness) -> None:
    # Train exits 0 (e.g. checkpointed on SIGTERM) but WORKDIR/final is missing: not finished.
    h.respond(state=[["READY", 0]], ssh=[["", 0]], storage_ls=[["", 1], ["gs://bucket/runs/13b/final/", 0]])
    proc = h.run("tpu_pod.sh", "resume", "--max-attempts", "3", "--retry-delay", "0", env=TPU_ENV)
    assert proc.returncode == 0, proc.stderr
    trains = [c for c in h.calls() if is_ssh(c) and "pkill" not in option(c, "--command")]
    assert len(trains) == 2


def test_tpu_resume_retries_when_recovery_fails(h: Harness) -> None:
    """The recreated queued resource fails while waiting for capacity: that costs one attempt,
    the next attempt deletes and recreates it again, installs and trains."""
    h.respond(
        state=[["SUSPENDED", 0], ["FAILED", 0], ["FAILED", 0], ["ACTIVE", 0]],
        ssh=[["", 0]],
        storage_ls=[["gs://bucket/runs/13b/final/", 0]],
    )
    proc = h.run("tpu_pod.sh", "resume", "--queued", "--git-url", "https://example.com/oc.git", "--max-attempts", "2",
                 "--retry-delay", "0", "--poll-interval", "1", env=TPU_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "not finished (recovering the slice failed with exit 2); retrying" in proc.stderr
    verbs = [c[4] if c[1] == "compute" else c[1] for c in h.calls()]
    assert verbs == ["describe", "delete", "create", "describe",  # attempt 1: FAILED while waiting
                     "describe", "delete", "create", "describe",  # attempt 2: FAILED -> recreate -> ACTIVE
                     "ssh", "ssh", "storage"]  # install, train, final check


def test_tpu_resume_needs_the_accelerator_type_up_front(h: Harness) -> None:
    proc = h.run("tpu_pod.sh", "resume", env={**TPU_ENV, "OPENCHAT_ACCELERATOR_TYPE": ""})
    assert proc.returncode == 2 and "missing required option --accelerator-type" in proc.stderr
    assert h.calls() == []


def test_tpu_resume_creates_a_missing_plain_vm(h: Harness) -> None:
    h.respond(state=[["", 1], ["READY", 0]], storage_ls=[["x", 0]])  # first describe: NOT_FOUND
    proc = h.run("tpu_pod.sh", "resume", "--preemptible", "--git-url", "https://example.com/oc.git", env=TPU_ENV)
    assert proc.returncode == 0, proc.stderr
    calls = h.calls()
    assert calls[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--preemptible" in calls[1]
    assert calls[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert "uv venv" in option(calls[3], "--command")  # installed on the new VM before training
    assert "oc-13b does not exist; creating it" in proc.stderr


@pytest.mark.parametrize("dest,staged", [("gs://bucket/runs/13b-hf", True), ("/home/me/hf", False)])
def test_tpu_export_on_worker_zero(h: Harness, dest: str, staged: bool) -> None:
    (ssh,) = h.dry("tpu_pod.sh", "export", "--hf-out", dest, env=TPU_ENV)
    assert "--worker=0" in ssh and "--worker=all" not in ssh
    remote = option(ssh, "--command")
    if staged:
        assert ("openchat-jax convert jax-to-hf --ckpt gs://bucket/runs/13b/final --out /tmp/openchat-stage/hf-out"
                " && gcloud storage rsync --recursive /tmp/openchat-stage/hf-out gs://bucket/runs/13b-hf") in remote
    else:
        assert remote == "~/openchat-venv/bin/openchat-jax convert jax-to-hf --ckpt gs://bucket/runs/13b/final --out /home/me/hf"


def test_tpu_prepare_and_import_base_pass_gcs_paths(h: Harness) -> None:
    (prep,) = h.dry("tpu_pod.sh", "prepare", "--", "--config.data.source=gs://bucket/raw/sharegpt.json", env=TPU_ENV)
    remote = option(prep, "--command")
    assert "--worker=0" in prep
    assert ("openchat-jax prepare --config configs/llama2_13b_openchat.py "
            "--config.data.dataset_dir=/tmp/openchat-stage/dataset --config.data.source=gs://bucket/raw/sharegpt.json"
            " && gcloud storage rsync --recursive /tmp/openchat-stage/dataset gs://bucket/data/openchat") in remote
    (imp,) = h.dry("tpu_pod.sh", "import-base", "--hf-dir", "gs://bucket/llama-2-13b-hf", "--init-from",
                   "gs://bucket/llama2-13b-jax", env=TPU_ENV)
    remote = option(imp, "--command")
    assert "gcloud storage rsync --recursive gs://bucket/llama-2-13b-hf /tmp/openchat-stage/hf-in" in remote
    assert ("convert hf-to-jax --hf-dir /tmp/openchat-stage/hf-in --out /tmp/openchat-stage/jax-out --add-eot"
            " && gcloud storage rsync --recursive /tmp/openchat-stage/jax-out gs://bucket/llama2-13b-jax") in remote


def test_tpu_stop_status_delete_ssh(h: Harness) -> None:
    (stop,) = h.dry("tpu_pod.sh", "stop", "--stop-timeout", "60", env=TPU_ENV)
    remote = option(stop, "--command")
    assert "--worker=all" in stop and remote.startswith("pkill -TERM -f 'bin/[o]penchat-jax train'")
    assert "[ $i -lt 12 ]" in remote
    assert h.dry("tpu_pod.sh", "status", "--queued", env=TPU_ENV) == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "oc-13b", "--zone=us-east5-a"]]
    assert h.dry("tpu_pod.sh", "delete", env=TPU_ENV) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "oc-13b", "--zone=us-east5-a", "--quiet"]]
    (ssh,) = h.dry("tpu_pod.sh", "ssh", "--worker", "3", "--ssh-arg=--tunnel-through-iap", "--", "ls", "-la", env=TPU_ENV)
    assert ssh[-3:] == ["--worker=3", "--command=ls -la", "--tunnel-through-iap"]


def test_tpu_stop_pattern_matches_the_trainer_not_itself(tmp_path: Path) -> None:
    """The remote pkill/pgrep pattern must match a trainer's command line and not the shell
    running the stop command (whose command line contains the pattern text)."""
    if shutil.which("pgrep") is None:
        pytest.skip("pgrep not installed")
    trainer = tmp_path / "openchat-venv" / "bin" / "openchat-jax"
    trainer.parent.mkdir(parents=True)
    trainer.write_text("#!/bin/sh\nsleep 30\n")
    trainer.chmod(0o755)
    proc = subprocess.Popen([str(trainer), "train", "--config", "x.py"])
    try:
        pattern = "bin/[o]penchat-jax train"
        # The shell prints its own pid first; a trainer running elsewhere on the machine may match too.
        found = subprocess.run(["bash", "-c", f"echo $$; pgrep -f '{pattern}'"], capture_output=True, text=True)
        shell_pid, *pids = found.stdout.split()
        assert str(proc.pid) in pids
        assert shell_pid not in pids  # the shell's argv holds the pattern text
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- one GPU node


def test_gpu_node_train_command(h: Harness) -> None:
    (cmd,) = h.dry("gpu_node.sh", "train", "--venv", "/opt/venv", "--config", "configs/llama2_13b_openchat.py",
                   "--workdir", "/data/runs/13b", "--dataset-dir", "gs://bucket/data/openchat", "--init-from",
                   "/data/llama2-13b-jax", "--gpus", "0,1,2,3", "--env", "XLA_FLAGS=--xla_gpu_a=true", "--",
                   "--config.train.micro_batches=4")
    assert cmd == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                   "XLA_FLAGS=--xla_gpu_a=true", "/opt/venv/bin/openchat-jax", "train", "--config",
                   "configs/llama2_13b_openchat.py", "--config.workdir=/data/runs/13b",
                   "--config.data.dataset_dir=gs://bucket/data/openchat", "--config.init_from=/data/llama2-13b-jax",
                   "--config.train.micro_batches=4"]
    (again,) = h.dry("gpu_node.sh", "resume", "--venv", "/opt/venv", "--config", "configs/llama2_13b_openchat.py",
                     "--workdir", "/data/runs/13b", "--dataset-dir", "gs://bucket/data/openchat", "--init-from",
                     "/data/llama2-13b-jax", "--gpus", "0,1,2,3", "--env", "XLA_FLAGS=--xla_gpu_a=true", "--",
                     "--config.train.micro_batches=4")
    assert again == cmd


def test_gpu_node_install_prepare_import_export(h: Harness) -> None:
    env = {"OPENCHAT_VENV": "/opt/venv"}
    assert h.dry("gpu_node.sh", "install", "--python", "python3.11", env=env) == [
        ["python3.11", "-m", "venv", "/opt/venv"],
        ["/opt/venv/bin/pip", "install", "--upgrade", "pip"],
        ["/opt/venv/bin/pip", "install", "jax[cuda12]>=0.7,<0.11"],
        ["/opt/venv/bin/pip", "install", "-e", str(REPO)],
    ]
    assert h.dry("gpu_node.sh", "prepare", "--config", "c.py", "--dataset-dir", "/d", env=env) == [
        ["/opt/venv/bin/openchat-jax", "prepare", "--config", "c.py", "--config.data.dataset_dir=/d"]]
    assert h.dry("gpu_node.sh", "import-base", "--hf-dir", "/hf/Llama-2-13b-hf", "--init-from", "/w/init", env=env) == [
        ["/opt/venv/bin/openchat-jax", "convert", "hf-to-jax", "--hf-dir", "/hf/Llama-2-13b-hf", "--out", "/w/init",
         "--add-eot"]]
    assert h.dry("gpu_node.sh", "export", "--workdir", "/w/run", "--hf-out", "/w/hf", env=env) == [
        ["/opt/venv/bin/openchat-jax", "convert", "jax-to-hf", "--ckpt", "/w/run/final", "--out", "/w/hf"]]


def test_gpu_node_reruns_train_until_final_exists(h: Harness, tmp_path: Path) -> None:
    """Not a dry run: a fake trainer crashes on its first run and writes WORKDIR/final on the
    second; the script reruns the identical command once and stops."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "trainer.jsonl"
    trainer = venv / "bin" / "openchat-jax"
    trainer.write_text(f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
log = Path({str(log)!r})
runs = len(log.read_text().splitlines()) if log.exists() else 0
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "mem": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}}) + "\\n")
if runs == 0:
    sys.exit(1)
workdir = [a for a in sys.argv if a.startswith("--config.workdir=")][0].split("=", 1)[1]
Path(workdir, "final").mkdir(parents=True)
""")
    trainer.chmod(0o755)
    workdir = tmp_path / "run"
    proc = h.run("gpu_node.sh", "train", "--venv", str(venv), "--config", "c.py", "--workdir", str(workdir),
                 "--dataset-dir", "/d", "--max-attempts", "3", "--retry-delay", "0")
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs) == 2 and runs[0] == runs[1]
    assert runs[0]["mem"] == "0.9" and runs[0]["argv"][:3] == ["train", "--config", "c.py"]
    assert "rerunning in 0s" in proc.stderr


# ---------------------------------------------------------------- SLURM


SLURM_ARGS = ["--nodes", "4", "--config", "configs/llama2_13b_openchat.py", "--workdir", "/shared/runs/13b",
              "--dataset-dir", "gs://bucket/data/openchat", "--init-from", "/shared/llama2-13b-jax"]


def test_slurm_submit_dry_run(h: Harness) -> None:
    cmds = h.dry("gpu_slurm.sh", "submit", *SLURM_ARGS, "--partition", "gpu", "--chain", "3", "--", "--config.x=1")
    assert cmds[0] == ["mkdir", "-p", "logs"]
    jobs = cmds[1:]
    assert len(jobs) == 3
    first = jobs[0]
    for want in ["sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue",
                 "--signal=TERM@300", "--partition=gpu", "--exclusive", "--open-mode=append",
                 f"--export=ALL,OPENCHAT_LAUNCH_DIR={LAUNCH}"]:
        assert want in first
    i = first.index(str(LAUNCH / "slurm_train.sbatch"))
    job_args = first[i + 1 :]
    assert job_args == ["--config", "configs/llama2_13b_openchat.py", "--workdir", "/shared/runs/13b",
                        "--dataset-dir", "gs://bucket/data/openchat", "--init-from", "/shared/llama2-13b-jax",
                        "--venv", str(REPO / ".venv"), "--procs", "per-gpu", "--gpus-per-node", "8",
                        "--mem-fraction", "0.9", "--", "--config.x=1"]
    assert not any(a.startswith("--dependency") for a in first)
    assert option(jobs[1], "--dependency") == "afterany:{job 1}"
    assert option(jobs[2], "--dependency") == "afterany:{job 2}"
    # Every chained job runs the same job script with the same arguments.
    for job in jobs[1:]:
        assert [a for a in job if not a.startswith("--dependency")] == first


def test_slurm_submit_chains_real_job_ids(h: Harness) -> None:
    h.respond(sbatch=[["101;cluster", 0], ["102", 0]])
    proc = h.run("gpu_slurm.sh", "resume", *SLURM_ARGS, "--chain", "2", "--after", "99", "--procs", "per-node",
                 "--cpus-per-task", "96", "--no-requeue", cwd=h.tmp)
    assert proc.returncode == 0, proc.stderr
    first, second = h.calls()
    assert option(first, "--dependency") == "afterany:99" and option(second, "--dependency") == "afterany:101"
    assert "--ntasks-per-node=1" in first and "--cpus-per-task=96" in first and "--no-requeue" in first
    assert proc.stdout.splitlines() == ["submitted job 101 (1 of 2)", "submitted job 102 (2 of 2)"]
    assert (h.tmp / "logs").is_dir()


def slurm_env(**extra: str) -> dict:
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "32", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_GPUS_ON_NODE": "8"}
    env.update(extra)
    return env


@pytest.mark.parametrize("procs,tasks,device_ids", [("per-gpu", "8", None), ("per-node", "1", "0,1,2,3,4,5,6,7")])
def test_slurm_job_script_sruns_one_train_command(h: Harness, procs: str, tasks: str, device_ids: str | None) -> None:
    args = ["--config", "configs/llama2_13b_openchat.py", "--workdir", "gs://bucket/runs/13b", "--dataset-dir",
            "gs://bucket/data/openchat", "--venv", "/shared/venv", "--procs", procs, "--", "--config.x=1"]
    printed = h.dry("slurm_train.sbatch", *args)
    proc = h.run("slurm_train.sbatch", *args, env=slurm_env(SLURM_CPUS_PER_TASK="12"))
    assert proc.returncode == 0, proc.stderr
    (srun,) = h.calls()
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=8"]
    assert "--cpus-per-task=12" in srun
    assert printed == [[a for a in srun if a != "--cpus-per-task=12"]]  # dry-run outside SLURM: no cpus
    i = srun.index("env")
    j = srun.index("/shared/venv/bin/openchat-jax")
    env_items = srun[i + 1 : j]
    assert ("JAX_LOCAL_DEVICE_IDS=" + device_ids in env_items) if device_ids else not any(
        e.startswith("JAX_LOCAL_DEVICE_IDS") for e in env_items)
    assert srun[j + 1 :] == EXPECTED_TRAIN + ["--config.x=1"]


def test_slurm_job_script_from_the_spool_dir(h: Harness, tmp_path: Path) -> None:
    """sbatch runs a copy of the script from its spool directory: it must still find common.sh."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(LAUNCH / "slurm_train.sbatch", copy)
    args = ["--config", "c.py", "--workdir", "gs://b/r", "--dataset-dir", "gs://b/d"]
    for env in ({"OPENCHAT_LAUNCH_DIR": str(LAUNCH)}, {"SLURM_SUBMIT_DIR": str(REPO)}):
        proc = h.run(str(copy), *args, env=slurm_env(**env))
        assert proc.returncode == 0, proc.stderr
    assert len(h.calls()) == 2
    proc = h.run(str(copy), *args, env=slurm_env(SLURM_SUBMIT_DIR=str(tmp_path)))
    assert proc.returncode == 2 and "set OPENCHAT_LAUNCH_DIR" in proc.stderr


def test_slurm_job_script_guards(h: Harness, tmp_path: Path) -> None:
    args = ["--config", "c.py", "--workdir", str(tmp_path / "run"), "--dataset-dir", "/d"]
    proc = h.run("slurm_train.sbatch", *args)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
    (tmp_path / "run" / "final").mkdir(parents=True)
    proc = h.run("slurm_train.sbatch", *args, env=slurm_env())
    assert proc.returncode == 0 and "training already finished" in proc.stderr
    assert h.calls() == []
