"""Tools the agent can call: a name, a description, JSON-schema arguments and a function. A tool's failure (bad
arguments, an exception, a timeout) comes back as an observation the loop can show or act on; nothing raises out
of the loop."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import jsonschema
from transformers.utils import get_json_schema


@dataclass
class ToolResult:
    """What a tool call produced: `content` (text for the model) or an `error`, and how long it took."""

    name: str
    arguments: dict[str, Any]
    content: str = ""
    error: Optional[str] = None
    seconds: float = 0.0
    data: Any = None  # the tool's raw result (e.g. the passages a lookup found)

    @property
    def ok(self) -> bool:
        return self.error is None

    def observation(self) -> str:
        """The text the model sees."""
        return self.content if self.ok else f"Error: {self.error}"


@dataclass
class Tool:
    """A callable tool. `parameters` is a JSON schema of the arguments object; `run` returns (text, raw data)."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., tuple[str, Any]]
    timeout: float = 30.0

    @classmethod
    def from_function(cls, function: Callable[..., tuple[str, Any]], timeout: float = 30.0) -> Tool:
        """A tool from a typed function with a Google-style docstring (the schema `transformers` derives for
        chat templates)."""
        schema = get_json_schema(function)["function"]
        return cls(schema["name"], schema["description"], schema["parameters"], function, timeout)

    def schema(self) -> dict[str, Any]:
        """The OpenAI / chat-template form: `{"type": "function", "function": {...}}`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolRegistry:
    """The tools an agent may call, by name."""

    tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise ValueError(f"A tool named {tool.name!r} is already registered.")
        self.tools[tool.name] = tool
        return tool

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, name: str, arguments: Any) -> ToolResult:
        """Run a tool; unknown tools, arguments that break the schema, exceptions and timeouts become errors in
        the result."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                return ToolResult(name, {}, error=f"arguments are not JSON ({error.msg})")
        arguments = arguments if isinstance(arguments, dict) else {}
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(name, arguments, error=f"no tool named {name!r} (tools: {sorted(self.tools)})")
        try:
            jsonschema.validate(arguments, tool.parameters)
        except jsonschema.ValidationError as error:
            return ToolResult(name, arguments, error=f"invalid arguments: {error.message}")
        start = time.perf_counter()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            content, data = pool.submit(tool.run, **arguments).result(timeout=tool.timeout)
        except concurrent.futures.TimeoutError:
            return ToolResult(name, arguments, error=f"timed out after {tool.timeout:g} s",
                              seconds=time.perf_counter() - start)
        except Exception as error:  # a tool's failure is an observation, never an exception out of the loop
            return ToolResult(name, arguments, error=f"{type(error).__name__}: {error}",
                              seconds=time.perf_counter() - start)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return ToolResult(name, arguments, str(content), seconds=time.perf_counter() - start, data=data)
