"""The code's shape, kept by tests rather than memory: one module talks to vLLM's request API, every
error class the project defines has one of the two bases, and the driver's classes stay small."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "rollout", "learner", "reward")
ENGINE = ROOT / "rollout" / "generation" / "engine.py"


def sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_only_the_engine_gives_vllm_requests_or_steps_it():
    """Single completions, episodes and whatever comes next are clients of `VLLMEngine`'s submit/step/abort."""
    request_api = {"llm_engine", "enqueue", "add_request", "abort_request"}
    offenders = []
    for path in sources():
        if path == ENGINE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in request_api:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_every_error_class_derives_from_user_error_or_job_failure():
    from contracts.errors import JobFailure, UserError

    allowed_outside = {"JobStopped"}  # a BaseException that must pass `except Exception` (the job's stop)
    outside = []
    for package in PACKAGES:
        for module_info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if module_info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(module_info.name)
            except ImportError as e:  # an optional engine or tracker not installed here
                pytest.skip(f"{module_info.name} does not import here: {e}")
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__ or not issubclass(cls, BaseException):
                    continue
                if issubclass(cls, Warning) or name in allowed_outside:
                    continue
                if not issubclass(cls, (UserError, JobFailure)):
                    outside.append(f"{module.__name__}.{name}")
    assert not outside, outside


def test_no_driver_class_holds_more_than_twelve_attributes():
    crowded = []
    for path in sorted((ROOT / "rollout" / "driver").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            attributes = {
                target.attr
                for target in ast.walk(node)
                if isinstance(target, ast.Attribute)
                and isinstance(target.ctx, ast.Store)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            }
            if len(attributes) > 12:
                crowded.append(f"{path.name}: {node.name} has {len(attributes)}: {sorted(attributes)}")
    assert not crowded, crowded
