"""The parameter reference of the documentation, generated when the site is built.

mkdocs loads this file as a hook (``hooks:`` in ``mkdocs.yml``): on a page holding
:data:`MARKER` it puts tables made from the Pydantic models of
``src/irv2_pipeline/parameters.py`` (each key's type and rule) and from
``conf/base/parameters*.yml`` (each key's value and the comment above it), plus the
value ``conf/smoke`` gives where it differs. Nothing in it is written by hand, so the
reference cannot fall behind the models or the configuration.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
MARKER = "<!-- parameter-reference -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
LIST_LINE = re.compile(r"^(?P<indent> *)- ")
# A value longer than this is summarised (presets, stage lists, variants).
MAX_VALUE_CHARS = 60


def _parameters_module() -> types.ModuleType:
    """``irv2_pipeline.parameters``, from ``src/`` when the package is not installed."""
    try:
        from irv2_pipeline import parameters  # noqa: PLC0415
    except ModuleNotFoundError:
        sys.path.insert(0, str(PROJECT / "src"))
        from irv2_pipeline import parameters  # noqa: PLC0415
    return parameters


def load_parameters(env: str) -> dict[str, Any]:
    """The top-level blocks of ``conf/<env>/parameters*.yml``, in file order."""
    blocks: dict[str, Any] = {}
    for path in sorted((PROJECT / "conf" / env).glob("parameters*.yml")):
        blocks.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return blocks


def yaml_comments(env: str = "base") -> dict[str, str]:
    """The comment written above (or after) each key of ``conf/<env>``, by dotted key.

    Keys inside list items (augmentation presets, stage lists) are not keys of the
    parameter tree and are left out.
    """
    comments: dict[str, str] = {}
    for path in sorted((PROJECT / "conf" / env).glob("parameters*.yml")):
        comments.update(_file_comments(path.read_text(encoding="utf-8")))
    return comments


def _file_comments(text: str) -> dict[str, str]:
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    list_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            pending = []
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None and indent > list_indent:
            pending = []
            continue
        list_indent = None
        if LIST_LINE.match(line):
            list_indent, pending = indent, []
            continue
        match = KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        rest = match["rest"]
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        text_of_key = " ".join([*pending, inline]).strip()
        if text_of_key:
            comments[".".join(key for _, key in stack)] = text_of_key
        pending = []
    return comments


def leaves(block: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) under ``block``; a mapping's keys are walked into."""
    if isinstance(block, dict) and block:
        for key, value in block.items():
            yield from leaves(value, f"{prefix}.{key}")
    else:
        yield prefix, block


def describe_annotation(annotation: Any) -> str:
    """A type annotation in words: ``whole number ≥ 0``, ``one of 'auto'``, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        words = []
        for item in args[1:]:
            words += _constraints(getattr(item, "metadata", [item]))
        return _joined(describe_annotation(args[0]), words)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_annotation(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(f"`{arg}`" for arg in args)
    if origin is tuple:
        return "[" + ", ".join(describe_annotation(arg) for arg in args) + "]"
    if annotation is type(None):
        return "null"
    names = {int: "whole number", float: "number", bool: "true/false", str: "text"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _joined(kind: str, constraints: list[str]) -> str:
    return f"{kind} {', '.join(constraints)}" if constraints else kind


def _constraints(metadata: list[Any]) -> list[str]:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    words = []
    for item in metadata:
        for name, sign in signs.items():
            if getattr(item, name, None) is not None:
                words.append(f"{sign} {getattr(item, name)}")
        func = getattr(item, "func", None)
        if func is not None and func.__doc__:
            words.append(f"({func.__doc__.strip().rstrip('.')})")
    return words


def field_rules(model: type, prefix: str) -> Iterator[tuple[str, str]]:
    """(dotted key, rule in words) for every field of a model, nested blocks walked."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        if isinstance(field.annotation, type) and hasattr(
            field.annotation, "model_fields"
        ):
            yield from field_rules(field.annotation, key)
            continue
        yield (
            key,
            _joined(
                describe_annotation(field.annotation), _constraints(field.metadata)
            ),
        )


def model_checks(model: type, prefix: str) -> Iterator[tuple[str, str]]:
    """(block, rule in words) for each rule between a block's keys (model validators)."""
    for validator in model.__pydantic_decorators__.model_validators.values():
        if validator.func.__doc__:
            yield prefix, validator.func.__doc__.strip()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and hasattr(
            field.annotation, "model_fields"
        ):
            yield from model_checks(field.annotation, f"{prefix}.{name}")


def _cell(value: Any) -> str:
    """A value as YAML writes it inline; a long one summarised."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    dumped = dumped.removesuffix("...").strip()
    if len(dumped) <= MAX_VALUE_CHARS:
        text = f"`{dumped}`"
    elif isinstance(value, list | dict):
        kind = "list" if isinstance(value, list) else "mapping"
        text = f"a {kind} of {len(value)} (see the file)"
    else:
        text = f"`{dumped[:MAX_VALUE_CHARS]}`..."
    return text.replace("|", "\\|")


def model_at(model: type, path: str) -> type:
    """The Pydantic model of a dotted block path, e.g. ``evaluation.diagnosis.x``."""
    for name in path.split("."):
        model = model.model_fields[name].annotation
    return model


def _checked_how(block: str, parameters: Any) -> str:
    """How a block's keys are checked, in words: by its model, or against conf/base."""
    against_base = (
        "keys are checked against conf/base's: an unknown key stops the run, "
        "naming the closest known one."
    )
    if block in parameters.MODELLED_BLOCKS:
        return "Each key's type and rule come from `irv2_pipeline.parameters`."
    parts = [p for p in parameters.MODELLED_BLOCKS if p.startswith(f"{block}.")]
    if not parts:
        return against_base[0].upper() + against_base[1:]
    named = ", ".join(f"`{part}`" for part in parts)
    return (
        f"The keys under {named} have their type and rule from "
        f"`irv2_pipeline.parameters`; the other {against_base}"
    )


def reference() -> str:
    """The whole reference, as Markdown: one section per parameter block."""
    parameters = _parameters_module()
    base, smoke = load_parameters("base"), load_parameters("smoke")
    comments = yaml_comments("base")
    rules: dict[str, str] = {}
    checks: list[tuple[str, str]] = []
    for block in parameters.MODELLED_BLOCKS:
        model = model_at(parameters.ProjectParameters, block)
        rules.update(field_rules(model, block))
        checks += list(model_checks(model, block))
    sections = []
    for block, values in base.items():
        file = next(
            path.name
            for path in sorted((PROJECT / "conf" / "base").glob("parameters*.yml"))
            if block in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        )
        lines = [
            f"### `{block}`",
            "",
            f"Set in `conf/base/{file}`. " + _checked_how(block, parameters),
            "",
        ]
        lines += [
            f"- Rule across keys of `{key}`: {text}"
            for key, text in checks
            if key.split(".")[0] == block
        ]
        if lines[-1] != "":
            lines.append("")
        header = "| key | type and rule | conf/base | conf/smoke | what it is |"
        lines += [header, "|---|---|---|---|---|"]
        smoke_values = dict(leaves(smoke.get(block, {}), block))
        for key, value in leaves(values, block):
            smoke_value = smoke_values.get(key, value)
            comment = comments.get(key, "").replace("|", "\\|")
            smoke_cell = "" if smoke_value == value else _cell(smoke_value)
            lines.append(
                f"| `{key}` | {rules.get(key, '')} | {_cell(value)} | "
                f"{smoke_cell} | {comment} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs hook: the reference in place of :data:`MARKER`."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
