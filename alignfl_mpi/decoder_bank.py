"""Stacked storage of same-shape MLP decoders, and their batched decode.

The server stores the latest decoder of every client and, every round, draws a few images
from each (5 each from 1000 decoders for a pool of 5000). Decoded one at a time, that is
four small matrix products per decoder, each paying the module and BLAS call overheads
and the BLAS's low speed on a handful of rows. Here the MLP decoders whose layers have
the same shapes keep their parameters stacked in blocks, ``(slots, out, in)`` and
``(slots, out)`` per Linear layer, so that one batched product per layer (``torch.bmm``)
decodes a run of a block's decoders.

The decoders stay ordinary modules: the parameters of their Linear layers are views of
their slot, so the state dict, the probe, the Lipschitz measurements and an in-place edit
all see the same numbers, and no tensor is held twice. Removing a decoder gives its
module its own copy of its parameters back and moves the stack's last decoder into the
hole, so only a stack's last block has unused slots, at most ``SLACK_SLOTS``: it grows to
1, 2, 4, 8, 12, ... ``BLOCK_SLOTS`` slots, copying the decoders it holds, and shrinks when
more are unused.

A decoder's outputs depend only on its parameters, its inputs and how many there are, not
on its slot or on the other decoders decoded with it (bit for bit on the CPU): a run holds
decoders with the same number of inputs, and one input is decoded as two, since the BLAS
takes another path for a single matrix-vector product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["BLOCK_SLOTS", "BMM_MAX_ROWS", "SLACK_SLOTS", "DecoderBank", "Slot", "decode_into",
           "mlp_layers"]

BLOCK_SLOTS = 16
"""Most decoders in one block (a 16-decoder block of the paper preset's MLP is 36 MB)."""

SLACK_SLOTS = 4
"""Most unused slots a stack's last block keeps: it grows to 1, 2, 4, 8, 12, ... slots and
shrinks when more than this many are unused."""

BMM_MAX_ROWS = 8
"""Up to this many inputs per decoder a layer is ``W @ x^T`` (the faster BLAS path for few
rows on the development CPU), above it ``x @ W^T``."""


def _capacity(n: int) -> int:
    """Slots for ``n`` decoders: 1, 2, then multiples of ``SLACK_SLOTS``.

    >>> [_capacity(n) for n in (1, 2, 3, 5, 9, 12)]
    [1, 2, 4, 8, 12, 12]
    """
    return n if n <= 2 else -(-n // SLACK_SLOTS) * SLACK_SLOTS


def mlp_layers(decoder: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a plain MLP decoder, or None if it is anything else.

    A plain MLP decoder is what ``models.MLPVAE.build_decoder`` builds without spectral
    normalisation: ``nn.Sequential`` of ``(Linear, ReLU) * k``, then ``Linear``, ``Sigmoid``
    and ``Unflatten``, every Linear with a bias and without parametrisations.

    >>> from alignfl_mpi.models import ModelSpec, build_decoder
    >>> [lin.out_features for lin in mlp_layers(build_decoder(ModelSpec(arch="mlp", hidden=(8,))))]
    [8, 784]
    >>> mlp_layers(build_decoder(ModelSpec(arch="conv"))) is None
    True
    """
    if type(decoder) is not nn.Sequential or len(decoder) < 3:
        return None
    *body, last, sigmoid, unflatten = list(decoder)
    if type(sigmoid) is not nn.Sigmoid or type(unflatten) is not nn.Unflatten:
        return None
    if len(body) % 2 or any(type(act) is not nn.ReLU for act in body[1::2]):
        return None
    layers: list[nn.Linear] = []
    for lin in [*body[0::2], last]:
        if not isinstance(lin, nn.Linear) or type(lin) is not nn.Linear \
                or lin.bias is None or parametrize.is_parametrized(lin):
            return None
        layers.append(lin)
    if unflatten.dim != 1 or int(torch.Size(unflatten.unflattened_size).numel()) \
            != layers[-1].out_features:
        return None
    ref = layers[0].weight
    if any(p.dtype != ref.dtype or p.device != ref.device
           for lin in layers for p in (lin.weight, lin.bias)):
        return None
    return layers


class Slot:
    """Where one banked decoder's parameters live: its block and its index there."""

    __slots__ = ("block", "decoder", "index", "layers")

    def __init__(self, *, block: _Block, index: int, decoder: nn.Module,
                 layers: list[nn.Linear]) -> None:
        self.block = block
        self.index = index
        self.decoder = decoder
        self.layers = layers

    def bind(self) -> None:
        """Point the module's Linear parameters at this slot's rows of the block."""
        for layer, weight, bias in zip(self.layers, self.block.weights, self.block.biases):
            _set_parameter(layer, "weight", weight[self.index])
            _set_parameter(layer, "bias", bias[self.index])

    def detach(self) -> None:
        """Give the module its own copy of its parameters (it leaves the bank)."""
        for layer in self.layers:
            _set_parameter(layer, "weight", layer.weight.detach().clone())
            _set_parameter(layer, "bias", layer.bias.detach().clone())


def _set_parameter(layer: nn.Linear, name: str, tensor: Tensor) -> None:
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


class _Block:
    """The stacked parameters of up to ``capacity`` decoders of one stack."""

    def __init__(self, key: tuple, like: Sequence[nn.Linear], capacity: int) -> None:
        self.key = key
        ref = like[0].weight
        self.weights = [torch.empty((capacity, *lin.weight.shape), dtype=ref.dtype,
                                    device=ref.device) for lin in like]
        self.biases = [torch.empty((capacity, *lin.bias.shape), dtype=ref.dtype,
                                   device=ref.device) for lin in like]
        self.slots: list[Slot] = []

    @property
    def capacity(self) -> int:
        return int(self.weights[0].shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.weights, *self.biases))

    def resize(self, capacity: int) -> None:
        """New tensors of ``capacity`` slots holding the occupied ones; rebind them."""
        n = len(self.slots)
        for tensors in (self.weights, self.biases):
            for i, old in enumerate(tensors):
                tensors[i] = torch.empty((capacity, *old.shape[1:]), dtype=old.dtype,
                                         device=old.device)
                tensors[i][:n] = old[:n]
        for slot in self.slots:
            slot.bind()

    def store(self, index: int, layers: Sequence[nn.Linear]) -> None:
        """Copy a decoder's parameters into slot ``index``."""
        with torch.no_grad():
            for lin, weight, bias in zip(layers, self.weights, self.biases):
                weight[index].copy_(lin.weight)
                bias[index].copy_(lin.bias)

    def forward(self, start: int, stop: int, x: Tensor) -> Tensor:
        """Decode ``x`` ``(stop - start, B, in)`` with slots ``start:stop``: ``(.., B, out)``.

        The result may be a transposed view (for few rows).
        """
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            weight, bias = weight[start:stop], bias[start:stop]
            if x.shape[1] > BMM_MAX_ROWS:
                x = torch.baddbmm(bias.unsqueeze(1), x, weight.mT)
            elif i < last:
                x = torch.bmm(weight, x.mT).mT.contiguous().add_(bias.unsqueeze(1))
            else:  # the caller copies the output anyway: no contiguous copy here
                x = torch.bmm(weight, x.mT).add_(bias.unsqueeze(2)).mT
            x = x.relu_() if i < last else x.sigmoid_()
        return x


class DecoderBank:
    """Blocks of stacked MLP decoder parameters, one stack of blocks per layer shape.

    >>> from alignfl_mpi.models import ModelSpec, build_decoder
    >>> bank, decoder = DecoderBank(), build_decoder(ModelSpec(arch="mlp", hidden=(8,)))
    >>> slot = bank.add(decoder)
    >>> decoder[0].weight.data_ptr() == slot.block.weights[0].data_ptr()
    True
    >>> bank.nbytes() == sum(t.numel() * 4 for t in decoder.state_dict().values())
    True
    >>> bank.remove(slot); bank.nbytes(), len(bank)
    (0, 0)
    """

    def __init__(self, *, block_slots: int = BLOCK_SLOTS) -> None:
        if block_slots < 1:
            raise ValueError(f"block_slots must be >= 1, got {block_slots}")
        self.block_slots = block_slots
        self._stacks: dict[tuple, list[_Block]] = {}
        self._members: dict[int, Slot] = {}  # id(module) -> its slot

    def add(self, decoder: nn.Module) -> Slot | None:
        """Move a plain MLP decoder's parameters into the bank; None if it stays as it is.

        Other decoders (convolutional, spectrally normalised, any other module) and a
        module already in the bank are not banked: they are decoded one at a time.
        """
        layers = mlp_layers(decoder)
        if layers is None or id(decoder) in self._members:
            return None
        ref = layers[0].weight
        key = (tuple(tuple(lin.weight.shape) for lin in layers), ref.dtype, str(ref.device))
        stack = self._stacks.setdefault(key, [])
        if not stack or len(stack[-1].slots) == self.block_slots:
            stack.append(_Block(key, layers, capacity=1))
        block = stack[-1]
        if len(block.slots) == block.capacity:
            block.resize(min(_capacity(len(block.slots) + 1), self.block_slots))
        slot = Slot(block=block, index=len(block.slots), decoder=decoder, layers=layers)
        block.slots.append(slot)
        block.store(slot.index, layers)
        slot.bind()
        self._members[id(decoder)] = slot
        return slot

    def remove(self, slot: Slot) -> None:
        """Take a decoder out: its module keeps a copy of its parameters, the hole is filled.

        Raises:
            ValueError: The slot is not in this bank.
        """
        if self._members.get(id(slot.decoder)) is not slot:
            raise ValueError("this slot is not in the bank")
        del self._members[id(slot.decoder)]
        stack = self._stacks[slot.block.key]
        slot.detach()
        last_block = stack[-1]
        last = last_block.slots.pop()
        if last is not slot:  # move the stack's last decoder into the hole
            slot.block.store(slot.index, last.layers)
            last.block, last.index = slot.block, slot.index
            slot.block.slots[slot.index] = last
            last.bind()
        if not last_block.slots:
            stack.pop()
            if not stack:
                del self._stacks[slot.block.key]
        elif last_block.capacity - len(last_block.slots) > SLACK_SLOTS:
            last_block.resize(_capacity(len(last_block.slots)))

    def nbytes(self) -> int:
        """Bytes of every block, unused slots included."""
        return sum(b.nbytes() for stack in self._stacks.values() for b in stack)

    def __len__(self) -> int:
        return len(self._members)


def decode_into(out: Tensor, *, inputs: Tensor,
                members: Sequence[tuple[Slot, int, int]]) -> None:
    """Decode banked decoders' rows of ``inputs`` into the same rows of ``out``.

    The members of one block are decoded in runs of consecutive slots with the same
    number of rows, one batched product per layer and run.

    Args:
        out: ``(M, out_features)`` images, flat, written in place.
        inputs: ``(M, in_features)`` decoder inputs (latents, and labels if conditional),
            on ``out``'s device; every member takes this input width.
        members: ``(slot, first row, number of rows)`` per decoder; the row ranges do not
            overlap, and no slot appears twice.
    """
    by_block: dict[int, list[tuple[int, int, int]]] = {}
    blocks: dict[int, _Block] = {}
    for slot, first, rows in members:
        if rows > 0:
            by_block.setdefault(id(slot.block), []).append((slot.index, first, rows))
            blocks[id(slot.block)] = slot.block
    for key, items in by_block.items():
        items.sort()
        run = [items[0]]
        for item in items[1:]:
            if item[0] == run[-1][0] + 1 and item[2] == run[0][2]:
                run.append(item)
            else:
                _decode_run(blocks[key], run, inputs, out)
                run = [item]
        _decode_run(blocks[key], run, inputs, out)


def _decode_run(block: _Block, run: list[tuple[int, int, int]], inputs: Tensor,
                out: Tensor) -> None:
    """One batched decode of a run of consecutive slots with ``rows`` rows each."""
    rows = run[0][2]
    firsts = torch.tensor([first for _, first, _ in run], device=inputs.device)
    width = 2 if rows == 1 else rows  # one row is decoded as two copies of it
    idx = firsts[:, None] + torch.arange(width, device=inputs.device).clamp_max(rows - 1)
    y = block.forward(run[0][0], run[-1][0] + 1, inputs[idx])[:, :rows]
    start = run[0][1]
    if all(first == start + j * rows for j, (_, first, _) in enumerate(run)):
        out[start:start + len(run) * rows].view(y.shape).copy_(y)  # the usual case
    else:
        out.index_copy_(0, idx[:, :rows].reshape(-1), y.reshape(-1, y.shape[-1]))
