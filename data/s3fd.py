"""S3FD face detector, built to load the weight file the original Wav2Lip preprocessing used.

S3FD (Zhang et al., "S3FD: Single Shot Scale-invariant Face Detector", ICCV 2017) is a VGG16
trunk with fc6/fc7 as convolutions, two extra stages (conv6, conv7), L2-normalised conv3_3,
conv4_3 and conv5_3 maps, and one classification/regression head per stage on anchors of stride
4 to 128 (anchor side 4x the stride). The conv3_3 classifier has three background outputs whose
maximum is taken ("max-out") before the softmax. Written here from that published description;
parameter names follow the widely distributed ``s3fd-619a316812.pth`` (``conv1_1.weight``,
``conv3_3_norm.weight``, ``conv3_3_norm_mbox_conf.weight``, ``fc6.weight``, ...), so that file
loads as is. Nothing is downloaded: the user passes the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.faces import downscale, full_res_box

log = logging.getLogger(__name__)

# Mean BGR->RGB pixel the weights were trained with (subtracted, no scaling).
_MEAN_RGB = (104.0, 117.0, 123.0)
_VARIANCES = (0.1, 0.2)
_STRIDES = (4, 8, 16, 32, 64, 128)
# (name, in, out) of the VGG16 trunk; a 2x2 max-pool follows each name in _POOL_AFTER.
_TRUNK = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)
_POOL_AFTER = frozenset({"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"})
# Source maps of the six heads: (name, channels, initial L2Norm scale or None).
_SOURCES = (
    ("conv3_3_norm", 256, 10.0), ("conv4_3_norm", 512, 8.0), ("conv5_3_norm", 512, 5.0),
    ("fc7", 1024, None), ("conv6_2", 512, None), ("conv7_2", 256, None),
)


class S3FDError(ValueError):
    """A weight file that cannot be used; the message names the file and the fix."""


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each position's channel vector, then scale it."""
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """The S3FD network; ``forward`` gives per-stage (face probability, box regression) maps."""

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout in _TRUNK:
            setattr(self, name, nn.Conv2d(cin, cout, 3, 1, 1))
        self.fc6 = nn.Conv2d(512, 1024, 3, 1, padding=3, dilation=3)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.conv6_1 = nn.Conv2d(1024, 256, 1)
        self.conv6_2 = nn.Conv2d(256, 512, 3, 2, 1)
        self.conv7_1 = nn.Conv2d(512, 128, 1)
        self.conv7_2 = nn.Conv2d(128, 256, 3, 2, 1)
        for name, channels, scale in _SOURCES:
            if scale is not None:
                setattr(self, name, L2Norm(channels, scale))
            conf_out = 4 if name == "conv3_3_norm" else 2  # max-out background on conv3_3
            setattr(self, f"{name}_mbox_conf", nn.Conv2d(channels, conf_out, 3, 1, 1))
            setattr(self, f"{name}_mbox_loc", nn.Conv2d(channels, 4, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run on a (N, 3, H, W) mean-subtracted RGB batch.

        Returns:
            For strides 4..128: face probability (N, h, w) and box offsets (N, 4, h, w).
        """
        taps: dict[str, torch.Tensor] = {}
        for name, _, _ in _TRUNK:
            x = F.relu(getattr(self, name)(x))
            if name in ("conv3_3", "conv4_3", "conv5_3"):
                taps[f"{name}_norm"] = getattr(self, f"{name}_norm")(x)
            if name in _POOL_AFTER:
                x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        taps["fc7"] = x
        x = F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        taps["conv6_2"] = x
        taps["conv7_2"] = F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        outputs = []
        for name, _, _ in _SOURCES:
            conf = getattr(self, f"{name}_mbox_conf")(taps[name])
            loc = getattr(self, f"{name}_mbox_loc")(taps[name])
            if conf.shape[1] == 4:
                background = conf[:, :3].amax(dim=1, keepdim=True)
                conf = torch.cat([background, conf[:, 3:]], dim=1)
            outputs.append((conf.softmax(dim=1)[:, 1], loc))
        return outputs


def decode_detections(
    outputs: list[tuple[torch.Tensor, torch.Tensor]],
    score_threshold: float = 0.05,
    nms_iou: float = 0.3,
    keep_threshold: float = 0.5,
) -> np.ndarray:
    """Turn the network's maps for one image into face boxes in its input pixels.

    Anchors sit at the centre of each cell (``stride / 2 + index * stride``) with side
    ``4 * stride``; offsets are decoded with variances (0.1, 0.2).

    Returns:
        (K, 5) float array of x1, y1, x2, y2, score, best first, scores above ``keep_threshold``.
    """
    boxes, scores = [], []
    for stride, (prob, loc) in zip(_STRIDES, outputs):
        prob, loc = prob[0], loc[0]
        ys, xs = torch.nonzero(prob > score_threshold, as_tuple=True)
        if len(ys) == 0:
            continue
        side = 4.0 * stride
        cx = stride / 2 + xs.float() * stride
        cy = stride / 2 + ys.float() * stride
        d = loc[:, ys, xs].float()
        cx = cx + d[0] * _VARIANCES[0] * side
        cy = cy + d[1] * _VARIANCES[0] * side
        w = side * torch.exp(d[2] * _VARIANCES[1])
        h = side * torch.exp(d[3] * _VARIANCES[1])
        boxes.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1))
        scores.append(prob[ys, xs].float())
    if not boxes:
        return np.zeros((0, 5), np.float32)
    all_boxes = torch.cat(boxes).numpy()
    all_scores = torch.cat(scores).numpy()
    xywh = np.column_stack([all_boxes[:, :2], all_boxes[:, 2:] - all_boxes[:, :2]])
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), all_scores.tolist(), score_threshold, nms_iou)
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    result = np.column_stack([all_boxes[kept], all_scores[kept]]).astype(np.float32)
    result = result[np.argsort(-result[:, 4], kind="stable")]
    return result[result[:, 4] > keep_threshold]


# TODO(faces): tested with random weights only; compare boxes with the released s3fd file.
def load_s3fd(path: str | Path, device: str | torch.device = "cpu") -> S3FD:
    """Build S3FD and load a weight file saved in the ``s3fd-619a316812.pth`` key format.

    Raises:
        S3FDError: The file is missing, unreadable or does not fit the network.
    """
    path = Path(path)
    if not path.is_file():
        raise S3FDError(f"S3FD weights not found: {path}; pass the s3fd .pth file with "
                        f"--s3fd-weights, or use --detector haar")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise S3FDError(f"cannot read S3FD weights {path} ({first}); download the file again")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = S3FD()
    expected = net.state_dict()
    if not isinstance(state, dict):
        raise S3FDError(f"{path} holds a {type(state).__name__}, not an S3FD state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != expected[k].shape]
    if missing or unexpected or bad:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else f"wrong shapes {bad[:3]}")
        raise S3FDError(f"{path} is not an S3FD state dict ({detail}); pass s3fd-619a316812.pth")
    net.load_state_dict(state)
    return net.to(device).eval()


class S3FDFaceDetector:
    """Face boxes from S3FD, as in the original Wav2Lip preprocessing.

    Args:
        weights: The S3FD weight file (``s3fd-619a316812.pth``).
        max_side: Frames with a longer side are downscaled to it for detection; boxes come back
            in full-resolution pixels. 0 detects at full resolution.
        device: Torch device; defaults to CUDA when available.
    """

    def __init__(
        self, weights: str | Path, max_side: int = 640, device: str | None = None
    ) -> None:
        self.weights = Path(weights)
        self.max_side = max_side
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = load_s3fd(self.weights, self.device)

    def __getstate__(self) -> dict:
        # Worker processes reload the file rather than receive 90 MB of pickled tensors.
        return {"weights": self.weights, "max_side": self.max_side, "device": self.device}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["weights"], state["max_side"], state["device"])

    @torch.inference_mode()
    def detect(self, frame_bgr: np.ndarray) -> list[tuple[int, int, int, int, float]]:
        """All faces with score above 0.5 as (x1, y1, x2, y2, score), best first."""
        h, w = frame_bgr.shape[:2]
        image, scale = downscale(frame_bgr, self.max_side)
        rgb = image[..., ::-1].astype(np.float32) - np.asarray(_MEAN_RGB, np.float32)
        batch = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].to(self.device)
        outputs = [(p.cpu(), loc.cpu()) for p, loc in self.net(batch)]
        faces = []
        for *corners, score in decode_detections(outputs):
            box = full_res_box(corners, scale, w, h)
            if box[2] > box[0] and box[3] > box[1]:
                faces.append((*box, float(score)))
        return faces
