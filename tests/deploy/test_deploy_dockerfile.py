"""The Dockerfile's stages: a worker image without torch, a train image, a bundle image.

No Docker engine runs on CI machines, so these tests read the Dockerfile instead of building it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field

import pytest
from deploy_helpers import REPO_ROOT

from worker.config import Settings

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def _stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    stage = None
    for line in _logical_lines(DOCKERFILE.read_text()):
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", arguments.strip(), flags=re.IGNORECASE)
            assert match, f"every stage needs a name: FROM {arguments}"
            stage = Stage(name=match.group(2), base=match.group(1))
            stages[stage.name] = stage
        elif stage is not None:
            stage.instructions.append((instruction, arguments.strip()))
    return stages


def _copy_sources(arguments: str) -> list[str]:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]
    return words[:-1]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Apply .dockerignore patterns in order, so the last matching pattern decides.

    A simplification of Docker's matcher: a pattern is tried against the whole path and
    against its first component, which is enough for the top-level allow-list used here.
    """
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path.rstrip("/"), glob) or fnmatch.fnmatch(path.split("/")[0], glob):
            ignored = not negated
    return ignored


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_stages_and_default_target() -> None:
    stages = _stages()

    assert list(stages) == ["worker-build", "train", "bundle", "worker"], "worker must stay last: it is the default target"


def test_base_images_pinned() -> None:
    for stage in _stages().values():
        name, _, tag = stage.base.rpartition(":")
        assert name, stage.name
        assert tag, stage.name
        assert tag != "latest", stage.name


@pytest.mark.parametrize("stage_name", ["train", "bundle", "worker"])
def test_image_runs_as_non_root(stage_name: str) -> None:
    assert _stages()[stage_name].last("USER") == "10001:10001"


def test_worker_build_installs_no_torch() -> None:
    stage = _stages()["worker-build"]
    copied = [source for arguments in stage.all("COPY") for source in _copy_sources(arguments)]
    runs = " ".join(stage.all("RUN"))

    assert sorted(copied) == ["constraints.txt", "pyproject.toml", "schemas/", "worker/"]
    assert "pip install -c constraints.txt ." in runs
    assert "[train]" not in runs
    assert '! /opt/streamrec/bin/python -c "import torch"' in runs


def test_worker_image_copies_only_the_venv() -> None:
    stage = _stages()["worker"]

    assert stage.all("COPY") == ["--from=worker-build /opt/streamrec /opt/streamrec"]


def test_worker_image_entrypoint_and_healthcheck() -> None:
    stage = _stages()["worker"]

    assert stage.last("ENTRYPOINT") == '["python", "-m", "worker"]'
    assert "/healthz" in stage.last("HEALTHCHECK")
    assert stage.last("EXPOSE") == "6066"


def test_worker_image_env_names_are_settings() -> None:
    env = " ".join(_stages()["worker"].all("ENV"))
    names = set(re.findall(r"\b(STREAMREC_[A-Z_]+)=", env))

    assert names
    assert sorted(names - set(Settings.env_names())) == []


def test_train_image_installs_train_extra() -> None:
    stage = _stages()["train"]
    runs = " ".join(stage.all("RUN"))

    assert 'pip install -c constraints.txt ".[train]"' in runs
    assert any("export/" in _copy_sources(arguments) for arguments in stage.all("COPY"))
    assert stage.last("ENTRYPOINT") == '["python", "-m", "export"]'


def test_bundle_image_reads_named_context() -> None:
    stage = _stages()["bundle"]

    assert stage.all("COPY") == ["--from=model-bundle --chown=10001:10001 / /bundle/"]


def test_dockerignore_keeps_sources_and_drops_the_rest() -> None:
    patterns = _dockerignore_patterns()
    sources = {source for stage in _stages().values() for arguments in stage.all("COPY") if "--from=" not in arguments
               for source in _copy_sources(arguments)}

    assert patterns[0] == "*", "an allow-list keeps unknown files out of the build context"
    for source in sources:
        assert not _ignored(source, patterns), source
    for path in (".venv", ".git", "tests", "artifacts", ".cache", "worker/__pycache__"):
        assert _ignored(path, patterns), path
