"""The Wav2Lip generator, as teacher (``slim=1``) or channel-slimmed student.

Re-implemented from the architecture facts of Prajwal et al., "A Lip Sync Expert Is All You Need
for Speech to Lip Generation In The Wild" (ACM MM 2020). Module and parameter names match the
released checkpoints (``wav2lip.pth``, ``wav2lip_gan.pth``) so that they load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

# (out_channels, kernel, stride, padding, residual layers after it) per face-encoder stage.
FACE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 7, 1, 3, 0),
    (32, 3, 2, 1, 2),
    (64, 3, 2, 1, 3),
    (128, 3, 2, 1, 2),
    (256, 3, 2, 1, 2),
    (512, 3, 2, 1, 1),
)
# The audio encoder is one flat Sequential: (out_channels, stride, residual layers after it).
AUDIO_STAGES: tuple[tuple[int, int | tuple[int, int], int], ...] = (
    (32, 1, 2),
    (64, (3, 1), 2),
    (128, 3, 2),
    (256, (3, 2), 1),
)
# (out_channels, kernel, stride, padding, output_padding, residual layers) per transposed stage.
DECODER_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (512, 3, 1, 0, 0, 1),
    (512, 3, 2, 1, 1, 2),
    (384, 3, 2, 1, 1, 2),
    (256, 3, 2, 1, 1, 2),
    (128, 3, 2, 1, 1, 2),
    (64, 3, 2, 1, 1, 2),
)
BOTTLENECK = 512
HEAD = 32
IMG_SIZE = 96


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


def slim_width(channels: int, slim: float) -> int:
    """Channels a layer keeps under a slim factor: rounded, and never fewer than one."""
    return max(1, round(channels * slim))


def _residuals(channels: int, count: int) -> list[nn.Module]:
    return [Conv2d(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


class Wav2Lip(nn.Module):
    """Wav2Lip generator; ``slim`` scales every internal width (1.0 is the original teacher).

    ``forward(audio, face)`` takes audio first, as the original does: either 4-D inference inputs,
    mel (N, 1, 80, 16) and face (N, 6, 96, 96), giving (N, 3, 96, 96); or 5-D training windows,
    mel (B, T, 1, 80, 16) and face (B, 6, T, 96, 96), giving (B, 3, T, 96, 96). Face channels are
    the lower-half-masked target (BGR, 0-1) followed by the reference frame.
    """

    def __init__(self, slim: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < slim <= 1.0:
            raise ValueError(f"slim must be in (0, 1], got {slim}; 1.0 is the original Wav2Lip")
        self.slim = float(slim)

        def w(channels: int) -> int:
            return slim_width(channels, slim)

        face_blocks: list[nn.Module] = []
        skip_widths: list[int] = []
        cin = 6
        for cout, k, s, p, n_res in FACE_STAGES:
            stage = [Conv2d(cin, w(cout), k, s, p), *_residuals(w(cout), n_res)]
            face_blocks.append(nn.Sequential(*stage))
            skip_widths.append(w(cout))
            cin = w(cout)
        bottleneck = w(BOTTLENECK)
        squeeze = [Conv2d(cin, bottleneck, 3, 1, 0), Conv2d(bottleneck, bottleneck, 1, 1, 0)]
        face_blocks.append(nn.Sequential(*squeeze))
        skip_widths.append(bottleneck)
        self.face_encoder_blocks = nn.ModuleList(face_blocks)

        audio_layers: list[nn.Module] = []
        cin = 1
        for cout, stride, n_res in AUDIO_STAGES:
            audio_layers += [Conv2d(cin, w(cout), 3, stride, 1), *_residuals(w(cout), n_res)]
            cin = w(cout)
        audio_layers += [Conv2d(cin, bottleneck, 3, 1, 0), Conv2d(bottleneck, bottleneck, 1, 1, 0)]
        self.audio_encoder = nn.Sequential(*audio_layers)

        decoder: list[nn.Module] = [nn.Sequential(Conv2d(bottleneck, bottleneck, 1, 1, 0))]
        cin = bottleneck + skip_widths[-1]
        for (cout, k, s, p, op, n_res), skip in zip(DECODER_STAGES, reversed(skip_widths[:-1])):
            stage = [Conv2dTranspose(cin, w(cout), k, s, p, op), *_residuals(w(cout), n_res)]
            decoder.append(nn.Sequential(*stage))
            cin = w(cout) + skip
        self.face_decoder_blocks = nn.ModuleList(decoder)

        self.output_block = nn.Sequential(
            Conv2d(cin, w(HEAD), 3, 1, 1), nn.Conv2d(w(HEAD), 3, 1, 1, 0), nn.Sigmoid()
        )

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(audio, face)[0]

    def forward_with_features(
        self, audio: torch.Tensor, face: torch.Tensor, taps: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the generator and also return the outputs of the decoder blocks listed in ``taps``.

        Tapped features are taken after each decoder block and before its skip concatenation,
        in the flattened (N, C, H, W) layout even for 5-D inputs.
        """
        windowed = face.dim() > 4
        if windowed:
            batch, steps = audio.shape[:2]
            # Time-major flattening (row t*B + b), as the original concatenates the T slices.
            audio = audio.transpose(0, 1).flatten(0, 1)
            face = face.permute(2, 0, 1, 3, 4).flatten(0, 1)

        x = self.audio_encoder(audio)
        skips = []
        feat = face
        for block in self.face_encoder_blocks:
            feat = block(feat)
            skips.append(feat)
        features: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.face_decoder_blocks):
            x = block(x)
            if index in taps:
                features[index] = x
            x = torch.cat((x, skips.pop()), dim=1)
        out = self.output_block(x)

        if windowed:
            out = out.unflatten(0, (steps, batch)).permute(1, 2, 0, 3, 4)
        return out, features

    def decoder_widths(self) -> list[int]:
        """Output channels of each decoder block (before concatenation), for feature adapters."""
        return [block[0].conv_block[1].num_features for block in self.face_decoder_blocks]
