"""Tile shapes the Triton kernels autotune over, and what `ptxas -v` says about them.

Each table is the one definition of its kernels' autotune configurations.  Next to them, as
data, stand the register-spill claims: the most bytes of spill stores `ptxas -v` reports for
each tile on sm_80 and sm_90, per operand precision, at ranks up to 16 (padded rank 16).
tests/kernels/test_triton_compile.py compiles every kernel for both targets ahead of time
(no GPU needed) and checks the claims, so a comment can no longer drift from the compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .triton_common import INTERPRETING

__all__ = ["Tile", "SpillClaim", "CONV_TILES", "A_GRAD_TILES", "SPILL_CLAIMS", "CLAIMED_RANK_PAD",
           "conv_configs", "a_grad_configs"]


@dataclass(frozen=True)
class Tile:
    """One autotune configuration.  block_n is BLOCK_N for the conv kernels, BLOCK_C for dA."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}/s{self.num_stages}"


# Output pixels x output channels (forward) or input pixels x input channels (dx), reduced in
# BLOCK_K steps.  (64, 32) and (32, 64) serve the narrow layers (efficientnet's 16-40
# channels) and small late-stage pixel counts.
CONV_TILES = (
    Tile(128, 128, 32, 8, 3),
    Tile(128, 64, 32, 8, 4),
    Tile(64, 128, 32, 8, 4),
    Tile(64, 64, 32, 4, 4),
    Tile(64, 32, 32, 4, 4),
    Tile(32, 64, 32, 4, 4),
)

# dA: BLOCK_M output pixels reduced per step into an (r, BLOCK_C) tile; block_k is unused.
A_GRAD_TILES = (
    Tile(64, 64, 0, 4, 4),
    Tile(128, 64, 0, 8, 4),
    Tile(64, 128, 0, 8, 4),
    Tile(128, 32, 0, 4, 4),
    Tile(256, 32, 0, 8, 3),
)

# Under the interpreter: one small tile, because autotuning would run every config on the CPU
# and small tiles make the tests cross block edges with small tensors.
_INTERPRETER_CONV_TILE = Tile(32, 16, 16, 4, 1)
_INTERPRETER_A_GRAD_TILE = Tile(32, 16, 0, 4, 1)

CLAIMED_RANK_PAD = 16


@dataclass(frozen=True)
class SpillClaim:
    """Most bytes of spill stores `ptxas -v` reports for one tile, over sm_80 and sm_90, at
    padded rank 16 (ranks 1-16): fp16/bf16 operands, fp32 with tf32 dots (torch's default for
    convolutions), fp32 with exact 'ieee' dots (torch.backends.cudnn.allow_tf32 = False).
    Rounded up to 64 bytes; 0 means spill-free."""

    half: int
    tf32: int
    ieee: int


# The kernels are built for 16-bit training (autocast): there every tile is spill-free except
# the 128x128 ones (kept for wide late layers; the autotuner decides).  fp32 operands double
# the tiles' register footprint and spill on most tiles: correct, but not the fast path.
SPILL_CLAIMS: dict[str, dict[Tile, SpillClaim]] = {
    "forward": {
        CONV_TILES[0]: SpillClaim(half=128, tf32=384, ieee=896),
        CONV_TILES[1]: SpillClaim(half=0, tf32=0, ieee=192),
        CONV_TILES[2]: SpillClaim(half=0, tf32=64, ieee=192),
        CONV_TILES[3]: SpillClaim(half=0, tf32=192, ieee=384),
        CONV_TILES[4]: SpillClaim(half=0, tf32=256, ieee=640),
        CONV_TILES[5]: SpillClaim(half=0, tf32=64, ieee=256),
    },
    "input_grad": {
        CONV_TILES[0]: SpillClaim(half=192, tf32=320, ieee=640),
        CONV_TILES[1]: SpillClaim(half=0, tf32=64, ieee=320),
        CONV_TILES[2]: SpillClaim(half=0, tf32=64, ieee=192),
        CONV_TILES[3]: SpillClaim(half=0, tf32=256, ieee=384),
        CONV_TILES[4]: SpillClaim(half=0, tf32=128, ieee=384),
        CONV_TILES[5]: SpillClaim(half=0, tf32=64, ieee=192),
    },
    "lora_a_grad": {
        A_GRAD_TILES[0]: SpillClaim(half=0, tf32=64, ieee=768),
        A_GRAD_TILES[1]: SpillClaim(half=0, tf32=128, ieee=512),
        A_GRAD_TILES[2]: SpillClaim(half=0, tf32=128, ieee=256),
        A_GRAD_TILES[3]: SpillClaim(half=0, tf32=64, ieee=192),
        A_GRAD_TILES[4]: SpillClaim(half=0, tf32=64, ieee=0),
    },
}


def _configs(tiles: tuple[Tile, ...], names: tuple[str, ...]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, (tile.block_m, tile.block_n, tile.block_k))),
                          num_warps=tile.num_warps, num_stages=tile.num_stages) for tile in tiles]


def conv_configs() -> list[triton.Config]:
    """Autotune configs of the forward and input-gradient kernels."""
    tiles = (_INTERPRETER_CONV_TILE,) if INTERPRETING else CONV_TILES
    return _configs(tiles, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


def a_grad_configs() -> list[triton.Config]:
    """Autotune configs of the dA kernel."""
    tiles = (_INTERPRETER_A_GRAD_TILE,) if INTERPRETING else A_GRAD_TILES
    return _configs(tiles, ("BLOCK_M", "BLOCK_C"))
