"""Direct calls inside ``{% experience %}``: the tag's reads and hooks compiled to filters.

Jinja compiles ``exp.string("title", "Welcome")`` to
``context.call(environment.getattr(exp, "string"), "title", "Welcome")`` and
``impression(exp)`` to ``context.call(impression, exp)``. ``Context.call`` introspects the
callable on every call (is it ``pass_context``? is its ``__call__``?): about 1 µs each,
15 of them on the benchmark's full page, the largest single cost of a personalized
page. A filter is resolved when the template is compiled, its ``pass_context`` included,
so ``rewrite_calls`` turns, in the tag's body and ``else`` branch:

- ``obj.READER(...)`` (``READER`` one of ``TemplateExperience``'s typed readers) into
  ``obj | _personalize_read("READER", ...)``;
- ``HOOK(...)`` (``HOOK`` one of the helper globals the extension installs) into
  ``HOOK | _personalize_call(...)``.

At render time the filters call the reader or the helper directly when the object IS
what the rewrite expected (a ``TemplateExperience``, the very helper function); anything
else (a name the template rebound, a dict, an undefined) goes through
``environment.getattr`` and ``Context.call`` as the untouched template would: same
result, same errors, same undefined behaviour. One difference is left: inside a
``{% for %}`` in the tag's body, Jinja gives a *call* (never a filter) the loop's
variables, and a ``pass_context`` callable a context that holds them. A callable the
template put under a helper's name and that reads a loop variable from its context would
no longer see it; the helpers themselves only read the request's handle
(``personalize``), which no loop sets.

Only environments with Jinja's own semantics are rewritten: a sandbox checks every
attribute and call itself (and the filters, reachable by name, check as the sandbox does),
and an environment overriding ``getattr`` or a context class overriding ``call`` keeps
its own ways.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from jinja2 import Environment, nodes, pass_context
from jinja2.async_utils import auto_await
from jinja2.runtime import Context
from jinja2.utils import internalcode

from ._readers import (
    TemplateExperience,
    impression,
    personalize_experience,
    personalize_url,
    personalize_value,
    track_click,
)

if TYPE_CHECKING:
    from jinja2.sandbox import SandboxedEnvironment

__all__ = ["CALL_FILTER", "READ_FILTER", "call", "direct_calls_apply", "read", "rewrite_calls"]

READ_FILTER = "_personalize_read"
CALL_FILTER = "_personalize_call"

#: ``TemplateExperience``'s typed readers, by name: what ``exp.NAME(...)`` may become.
_READERS: Mapping[str, Callable[..., Any]] = {
    name: getattr(TemplateExperience, name)
    for name in ("get", "string", "number", "boolean", "url", "json")
}
#: The helper globals a tag's body calls. Matched by name when compiling, by identity
#: when rendering (``id``: a rebound name may hold something unhashable; these
#: module-level functions live as long as the process, so their ids stay theirs).
_HOOKS: Mapping[str, Callable[..., Any]] = {
    "impression": impression,
    "track_click": track_click,
    "personalize_value": personalize_value,
    "personalize_url": personalize_url,
    "personalize_experience": personalize_experience,
}
_HOOK_IDS = frozenset(map(id, _HOOKS.values()))


def direct_calls_apply(environment: Environment) -> bool:
    """Whether ``environment`` resolves attributes and calls as stock Jinja does, so
    calling a reader or helper directly is what the template would have done."""
    return (
        not environment.sandboxed
        and type(environment).getattr is Environment.getattr
        and environment.context_class.call is Context.call
    )


def rewrite_calls(body: list[nodes.Node], environment: Environment) -> list[nodes.Node]:
    """``body`` (a tag's statements) with its reads and hooks turned into the filters;
    the nodes are changed in place. Idempotent: a rewritten call is a filter, which is
    never rewritten again (so an outer tag walks through an inner one's body safely)."""
    if direct_calls_apply(environment):
        body[:] = [_rewrite(node) for node in body]
    return body


def _rewrite(node: nodes.Node) -> nodes.Node:
    """``node`` with its children rewritten (in place), or the filter it becomes."""
    _rewrite_fields(node)
    return _direct(node) if isinstance(node, nodes.Call) else node


def _rewrite_fields(node: nodes.Node) -> None:
    for field, value in node.iter_fields():
        if isinstance(value, list):
            value[:] = [_rewrite(item) if isinstance(item, nodes.Node) else item for item in value]
        elif isinstance(node, nodes.CallBlock) and field == "call":
            _rewrite_fields(value)  # {% call %} needs its Call node: only inside it
        elif isinstance(value, nodes.Node):
            setattr(node, field, _rewrite(value))


def _direct(call: nodes.Call) -> nodes.Node:
    callee = call.node
    lineno = call.lineno
    if isinstance(callee, nodes.Getattr) and callee.attr in _READERS:
        args: list[nodes.Expr] = [nodes.Const(callee.attr, lineno=lineno), *call.args]
        return nodes.Filter(
            callee.node,
            READ_FILTER,
            args,
            call.kwargs,
            call.dyn_args,
            call.dyn_kwargs,
            lineno=lineno,
        )
    if isinstance(callee, nodes.Name) and callee.ctx == "load" and callee.name in _HOOKS:
        return nodes.Filter(
            callee,
            CALL_FILTER,
            call.args,
            call.kwargs,
            call.dyn_args,
            call.dyn_kwargs,
            lineno=lineno,
        )
    return call


# -- the filters (positional-only: a template's keyword never collides with them) -----------


@pass_context
@internalcode
def read(context: Context, obj: Any, attr: str, /, *args: Any, **kwargs: Any) -> Any:
    """``obj.ATTR(*args, **kwargs)``: the reader itself for a ``TemplateExperience``
    (exactly that type: a subclass may override it), else as Jinja would call it."""
    if type(obj) is TemplateExperience:
        reader = _READERS.get(attr)
        if reader is not None:
            try:
                return reader(obj, *args, **kwargs)
            except StopIteration:
                return _stopped(context)
    environment = context.environment
    method = environment.getattr(obj, attr)
    if environment.is_async and inspect.isawaitable(method):
        return _call_awaited(context, method, args, kwargs)  # Jinja awaits the attribute
    return _call_as_written(context, method, args, kwargs)


@pass_context
@internalcode
def call(context: Context, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: the helper itself when ``fn`` is one the extension
    installed (all ``pass_context``), else as Jinja would call it (a macro, a ``set``, an
    import or a render variable may have taken the name)."""
    if id(fn) in _HOOK_IDS:
        try:
            return fn(context, *args, **kwargs)
        except StopIteration:
            return _stopped(context)
    return _call_as_written(context, fn, args, kwargs)


@internalcode
def _call_as_written(
    context: Context, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    environment = context.environment
    if environment.sandboxed:  # what the compiler writes for a call in a sandbox
        return cast("SandboxedEnvironment", environment).call(context, fn, *args, **kwargs)
    return context.call(fn, *args, **kwargs)


async def _call_awaited(
    context: Context, method: Awaitable[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return await auto_await(_call_as_written(context, await method, args, kwargs))


def _stopped(context: Context) -> Any:
    # What Context.call makes of a callable raising StopIteration.
    return context.environment.undefined(
        "value was undefined because a callable raised a StopIteration exception"
    )
