"""Audio loading and the Wav2Lip mel-spectrogram front-end.

The spectrogram follows the hyper-parameters of Prajwal et al., "A Lip Sync Expert Is All You Need
for Speech to Lip Generation In The Wild" (ACM MM 2020): 16 kHz audio, pre-emphasis 0.97, an
800-point STFT every 200 samples (80 frames per second), 80 Slaney mel bands from 55 to 7600 Hz,
and a symmetric log scale clipped to [-4, 4]. Written from those facts with torch/torchaudio
transforms; decoding uses PyAV, so no system FFmpeg is needed.
"""

from __future__ import annotations

import functools
import logging
import wave
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS = 4.0
MEL_STEP = 16  # mel columns per model window (200 ms)
MEL_PER_SECOND = SAMPLE_RATE // HOP  # 80
# Video frame rate the teacher was trained at; preprocessing resamples every clip onto it.
FPS = 25
# Shortest usable audio: one 16-column mel window (200 ms) for one video frame.
MIN_AUDIO_SECONDS = MEL_STEP / MEL_PER_SECOND

# -100 dB floor on the magnitude, as in the original front-end.
_AMP_FLOOR = 10.0 ** (MIN_LEVEL_DB / 20.0)


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the fix."""


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> tuple[torch.Tensor, float]:
    """Decode the first audio stream of a file to mono, and say when its first sample plays.

    Channels are averaged (as librosa does) and the signal is resampled with libswresample.

    Args:
        path: Any file FFmpeg can demux (WAV 16/24-bit, MP3, AAC in MP4, ...).
        sample_rate: Output rate in Hz.

    Returns:
        The 1-D float32 waveform in [-1, 1], and the presentation time of its first sample in
        seconds (0.0 when the container gives none), which preprocessing uses to line the audio
        up with the first video frame.

    Raises:
        AudioError: The file is missing, has no audio stream, cannot be decoded or is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found; check the path")
    chunks: list[np.ndarray] = []
    start: float | None = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(
                    f"{path}: no audio stream; give a video or audio file with a sound track"
                )
            stream = container.streams.audio[0]
            # Keep the channel layout here and average below, so the downmix matches librosa's
            # plain mean rather than libswresample's -3 dB matrix.
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            for frame in container.decode(stream):
                if start is None and frame.time is not None:
                    start = float(frame.time)
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    except av.FFmpegError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(
            f"{path}: cannot decode audio ({reason}); re-encode it, e.g. to 16-bit PCM WAV"
        ) from exc
    if not chunks or sum(c.shape[-1] for c in chunks) == 0:
        raise AudioError(f"{path}: the audio stream is empty; give a file with sound in it")
    wav = np.concatenate(chunks, axis=-1).mean(axis=0)
    return torch.from_numpy(np.clip(wav, -1.0, 1.0).astype(np.float32)), start or 0.0


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode an audio or video file to a mono float waveform (see ``decode_audio``).

    Returns:
        1-D float32 tensor in [-1, 1].

    Raises:
        AudioError: The file is missing, has no audio stream, cannot be decoded or is empty.
    """
    return decode_audio(path, sample_rate)[0]


def save_wav(
    path: str | Path, wav: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write a mono waveform in [-1, 1] as 16-bit PCM WAV.

    Args:
        path: Destination file.
        wav: 1-D float waveform; values outside [-1, 1] are clipped.
        sample_rate: Rate in Hz stored in the header.
    """
    samples = np.asarray(wav, dtype=np.float64).reshape(-1)
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def num_mel_frames(num_samples: int) -> int:
    """Mel columns that ``melspectrogram`` gives for a waveform of ``num_samples`` samples."""
    return 1 + num_samples // HOP


@functools.lru_cache(maxsize=8)
def _stft_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Periodic Hann (scipy/librosa's default); a symmetric one shifts values by up to 0.06.
    window = torch.hann_window(WIN, periodic=True, dtype=torch.float32, device=device)
    fbank = torchaudio.functional.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1,
        f_min=FMIN,
        f_max=FMAX,
        n_mels=N_MELS,
        sample_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return window, fbank.T.contiguous().to(device)


def melspectrogram(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Wav2Lip's normalised log-mel spectrogram of a 16 kHz waveform.

    Args:
        wav: 1-D float waveform at 16 kHz, at least ``N_FFT // 2 + 1`` samples long.

    Returns:
        float32 tensor of shape (80, 1 + len(wav) // 200), values in [-4, 4].

    Raises:
        ValueError: The input is not 1-D or is too short for a centred, reflect-padded STFT.
    """
    wav = torch.as_tensor(wav)
    if wav.dim() != 1:
        raise ValueError(f"melspectrogram expects a 1-D waveform, got shape {tuple(wav.shape)}")
    if wav.numel() <= N_FFT // 2:
        raise ValueError(
            f"waveform of {wav.numel()} samples is too short; need at least {N_FFT // 2 + 1}"
        )
    wav = wav.to(torch.float32)
    window, fbank = _stft_constants(wav.device)
    # torchaudio's lfilter clamps its output to [-1, 1] by default, which corrupts loud audio;
    # preemphasis does not clamp.
    emphasised = torchaudio.functional.preemphasis(wav, coeff=PREEMPHASIS)
    spec = torch.stft(
        emphasised,
        n_fft=N_FFT,
        hop_length=HOP,
        win_length=WIN,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    ).abs()
    mel = fbank @ spec
    db = 20.0 * torch.log10(mel.clamp_min(_AMP_FLOOR)) - REF_LEVEL_DB
    scaled = 2 * MAX_ABS * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS
    return scaled.clamp(-MAX_ABS, MAX_ABS)
