"""How deep the backward pass runs: the hooks that silently extend it to the embeddings, and a monitor that
measures where it really stopped.

Autograd stops the backward pass at the lowest block with a trainable parameter; that is where most of selective
LoRA's speed comes from. ``enable_input_require_grads()`` (PEFT's k-bit preparation, transformers' checkpointing)
makes the embeddings' output require grad and throws that away: :func:`remove_input_require_grads_hooks` takes such
hooks off, and :class:`BackwardDepthMonitor` records the lowest block each backward pass reached.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from aletheia_lora.layers import DecoderStack, resolve_stack, unwrap_model
from aletheia_lora.probe import is_probing

EMBEDDINGS = -1  # "lowest layer reached" when the backward pass ran down into the embeddings
_INPUT_GRAD_HOOKS = {"make_inputs_require_grads", "make_inputs_require_grad"}


def remove_input_require_grads_hooks(model: nn.Module) -> int:
    """Remove every forward hook that makes an embedding output require grad; return how many were removed.

    ``enable_input_require_grads()`` is needed only by reentrant checkpointing; with it, the backward pass
    runs down to the embeddings whatever layers are adapted. Enabling checkpointing and then wrapping with
    PEFT registers two such hooks, and one ``disable_input_require_grads()`` removes only one.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del module._forward_hooks[key]
                removed += 1
    for wrapper in (model, unwrap_model(model)):
        # transformers keeps the handle to remove the hook later; it is gone now
        if hasattr(wrapper, "_require_grads_hook"):
            try:
                del wrapper._require_grads_hook
            except AttributeError:
                pass
    return removed


def count_input_require_grads_hooks(model: nn.Module) -> int:
    """How many input-require-grads hooks the model carries."""
    return sum(
        getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS
        for m in model.modules()
        for hook in m._forward_hooks.values()
    )


class BackwardDepthMonitor:
    """Records the lowest decoder block the backward pass actually reached (``EMBEDDINGS`` = below block 0).

    A tensor hook on each block's output fires only when autograd computes the gradient there, so this
    measures what happened, not what the configuration suggests. Passes of a gradient probe run meanwhile
    (re-probing) are not training passes and are left out.
    """

    def __init__(self, model: nn.Module, stack: DecoderStack | None = None) -> None:
        self.stack = resolve_stack(model, stack)
        self.lowest: int | None = None
        self.recent: int | None = None  # the lowest since the last take()
        self._handles = []

    def _record(self, index: int) -> None:
        self.lowest = index if self.lowest is None else min(self.lowest, index)
        self.recent = index if self.recent is None else min(self.recent, index)

    def take(self) -> int | None:
        """The lowest block reached since the last call (e.g. in the last step), None if no backward pass ran."""
        recent, self.recent = self.recent, None
        return recent

    def _on_output(self, index: int, module: nn.Module, args, output) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not is_probing() and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._record(index) or grad)

    def _on_first_input(self, module: nn.Module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not is_probing() and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._record(EMBEDDINGS) or grad)

    def __enter__(self) -> BackwardDepthMonitor:
        for i, block in enumerate(self.stack.blocks):
            self._handles.append(block.register_forward_hook(partial(self._on_output, i)))
        self._handles.append(self.stack.blocks[0].register_forward_pre_hook(self._on_first_input, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
