"""The Wav2Lip generator, as teacher (the default) or a student slimmed by a :class:`StudentSpec`.

Re-implemented from the architecture facts of Prajwal et al., "A Lip Sync Expert Is All You Need
for Speech to Lip Generation In The Wild" (ACM MM 2020). Module and parameter names match the
released checkpoints (``wav2lip.pth``, ``wav2lip_gan.pth``) so that they load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.spec import StudentSpec, slim_width

__all__ = ["TAP_NAMES", "Conv2d", "Conv2dTranspose", "Wav2Lip", "slim_width"]

# Layer geometry of the original; widths and residual counts come from a StudentSpec.
# (kernel, stride, padding) per face-encoder stage; the bottleneck block follows them.
FACE_STAGES: tuple[tuple[int, int, int], ...] = (
    (7, 1, 3),
    (3, 2, 1),
    (3, 2, 1),
    (3, 2, 1),
    (3, 2, 1),
    (3, 2, 1),
)
# Stride per audio-encoder stage (all 3x3, padding 1); the embedding convs follow them.
AUDIO_STAGES: tuple[int | tuple[int, int], ...] = (1, (3, 1), 3, (3, 2))
# (kernel, stride, padding, output_padding) per transposed decoder block 1-6.
DECODER_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (3, 1, 0, 0),
    (3, 2, 1, 1),
    (3, 2, 1, 1),
    (3, 2, 1, 1),
    (3, 2, 1, 1),
    (3, 2, 1, 1),
)
IMG_SIZE = 96
# Feature taps by name, for distillation: the 7 face-encoder blocks (6 stages + bottleneck), the
# audio embedding, and the 7 decoder blocks (before each skip concatenation).
FACE_TAP, AUDIO_TAP, DECODER_TAP = "face_encoder", "audio_encoder", "face_decoder"
TAP_NAMES: tuple[str, ...] = (
    *(f"{FACE_TAP}.{i}" for i in range(len(FACE_STAGES) + 1)),
    AUDIO_TAP,
    *(f"{DECODER_TAP}.{i}" for i in range(len(DECODER_STAGES) + 1)),
)


class Conv2d(nn.Module):
    """Conv + BatchNorm (+ identity residual) + ReLU; the residual is added before the ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and cin != cout:
            raise ValueError(f"a residual conv needs cin == cout, got {cin} and {cout}")
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """Transposed conv + BatchNorm + ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, output_padding: int
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _residuals(channels: int, count: int) -> list[nn.Module]:
    return [Conv2d(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


def _out_channels(layers: nn.Sequential) -> int:
    # Every stage ends in a conv wrapper whose BatchNorm has the stage's output width.
    return layers[-1].conv_block[1].num_features


class Wav2Lip(nn.Module):
    """Wav2Lip generator: the original teacher by default, or a student built from a spec.

    ``Wav2Lip(slim)`` scales every internal width; ``Wav2Lip(spec=StudentSpec(...))`` also sets
    per-stage widths and residual layers (see :mod:`models.spec`). Module names follow the
    released checkpoints; a stage that keeps ``k`` residual layers numbers them ``1..k`` after its
    stage conv, and in the flat audio encoder the following layers move up accordingly.

    ``forward(audio, face)`` takes audio first, as the original does: either 4-D inference inputs,
    mel (N, 1, 80, 16) and face (N, 6, 96, 96), giving (N, 3, 96, 96); or 5-D training windows,
    mel (B, T, 1, 80, 16) and face (B, 6, T, 96, 96), giving (B, 3, T, 96, 96). Face channels are
    the lower-half-masked target (BGR, 0-1) followed by the reference frame.
    """

    def __init__(self, slim: float | None = None, spec: StudentSpec | None = None) -> None:
        super().__init__()
        if spec is not None and slim is not None:
            raise ValueError(f"give slim ({slim}) or spec, not both; put slim in the spec")
        self.spec = spec if spec is not None else StudentSpec(slim=1.0 if slim is None else slim)
        self.slim = self.spec.slim
        face_w, audio_w = self.spec.face_widths(), self.spec.audio_widths()
        dec_w, residuals = self.spec.decoder_widths(), self.spec.residual_counts()

        face_blocks: list[nn.Module] = []
        cin = 6
        for (k, s, p), cout, n_res in zip(FACE_STAGES, face_w, residuals["face"]):
            face_blocks.append(nn.Sequential(Conv2d(cin, cout, k, s, p), *_residuals(cout, n_res)))
            cin = cout
        bottleneck = face_w[-1]
        face_blocks.append(nn.Sequential(
            Conv2d(cin, bottleneck, 3, 1, 0), Conv2d(bottleneck, bottleneck, 1, 1, 0)
        ))
        self.face_encoder_blocks = nn.ModuleList(face_blocks)

        audio_layers: list[nn.Module] = []
        cin = 1
        for stride, cout, n_res in zip(AUDIO_STAGES, audio_w, residuals["audio"]):
            audio_layers += [Conv2d(cin, cout, 3, stride, 1), *_residuals(cout, n_res)]
            cin = cout
        embedding = audio_w[-1]
        audio_layers += [Conv2d(cin, embedding, 3, 1, 0), Conv2d(embedding, embedding, 1, 1, 0)]
        self.audio_encoder = nn.Sequential(*audio_layers)

        decoder: list[nn.Module] = [nn.Sequential(Conv2d(embedding, dec_w[0], 1, 1, 0))]
        cin = dec_w[0] + bottleneck
        skips = reversed(face_w[:-1])
        for (k, s, p, op), cout, n_res, skip in zip(
            DECODER_STAGES, dec_w[1:], residuals["decoder"], skips
        ):
            stage = [Conv2dTranspose(cin, cout, k, s, p, op), *_residuals(cout, n_res)]
            decoder.append(nn.Sequential(*stage))
            cin = cout + skip
        self.face_decoder_blocks = nn.ModuleList(decoder)

        head = self.spec.head_width()
        self.output_block = nn.Sequential(
            Conv2d(cin, head, 3, 1, 1), nn.Conv2d(head, 3, 1, 1, 0), nn.Sigmoid()
        )

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(audio, face)[0]

    def forward_with_features(
        self, audio: torch.Tensor, face: torch.Tensor, taps: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the generator and also return the intermediate features named in ``taps``.

        Names (see :data:`TAP_NAMES`): ``face_encoder.<i>`` is face-encoder block ``i``'s output
        (0-5 the stages, 6 the bottleneck), ``audio_encoder`` the audio embedding, and
        ``face_decoder.<i>`` decoder block ``i``'s output before its skip concatenation.
        Features come back as ``{name: tensor}`` in the flattened (N, C, H, W) layout, even for
        5-D inputs.
        """
        unknown = [name for name in taps if name not in TAP_NAMES]
        if unknown:
            raise ValueError(f"unknown feature taps {unknown}; use {', '.join(TAP_NAMES)}")
        wanted = set(taps)
        windowed = face.dim() > 4
        if windowed:
            batch, steps = audio.shape[:2]
            # Time-major flattening (row t*B + b), as the original concatenates the T slices.
            audio = audio.transpose(0, 1).flatten(0, 1)
            face = face.permute(2, 0, 1, 3, 4).flatten(0, 1)

        features: dict[str, torch.Tensor] = {}
        x = self.audio_encoder(audio)
        if AUDIO_TAP in wanted:
            features[AUDIO_TAP] = x
        skips = []
        feat = face
        for index, block in enumerate(self.face_encoder_blocks):
            feat = block(feat)
            skips.append(feat)
            if f"{FACE_TAP}.{index}" in wanted:
                features[f"{FACE_TAP}.{index}"] = feat
        for index, block in enumerate(self.face_decoder_blocks):
            x = block(x)
            if f"{DECODER_TAP}.{index}" in wanted:
                features[f"{DECODER_TAP}.{index}"] = x
            x = torch.cat((x, skips.pop()), dim=1)
        out = self.output_block(x)

        if windowed:
            out = out.unflatten(0, (steps, batch)).permute(1, 2, 0, 3, 4)
        return out, features

    def feature_widths(self) -> dict[str, int]:
        """Channels of every tappable feature (see :meth:`forward_with_features`), by name."""
        widths = {f"{FACE_TAP}.{i}": _out_channels(block)
                  for i, block in enumerate(self.face_encoder_blocks)}
        widths[AUDIO_TAP] = _out_channels(self.audio_encoder)
        widths.update({f"{DECODER_TAP}.{i}": _out_channels(block)
                       for i, block in enumerate(self.face_decoder_blocks)})
        return widths

    def decoder_widths(self) -> list[int]:
        """Output channels of each decoder block (before concatenation), for feature adapters."""
        return [block[0].conv_block[1].num_features for block in self.face_decoder_blocks]
