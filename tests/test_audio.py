"""data.audio against an independent librosa/scipy reference of the Wav2Lip front-end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from data import audio

librosa = pytest.importorskip("librosa")
signal = pytest.importorskip("scipy.signal")


def reference_mel(wav: np.ndarray) -> np.ndarray:
    """The original recipe, step by step, with librosa and scipy."""
    emphasised = signal.lfilter([1, -0.97], [1], wav)
    spec = np.abs(
        librosa.stft(
            emphasised, n_fft=800, hop_length=200, win_length=800, center=True, pad_mode="reflect"
        )
    )
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


@pytest.fixture(scope="module")
def speech(samples_dir: Path) -> torch.Tensor:
    return audio.load_audio(samples_dir / "aud_jfk_16k_mono.wav")


def test_speech_matches_reference(speech: torch.Tensor) -> None:
    ours = audio.melspectrogram(speech).numpy()
    ref = reference_mel(speech.numpy().astype(np.float64))
    assert ours.shape == ref.shape == (80, 1 + len(speech) // 200)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"max abs difference {err:.2e}"


def test_loud_speech_matches_reference(speech: torch.Tensor) -> None:
    # Speech driven into clipping at +-0.99, like a loud recording; its pre-emphasis exceeds 1,
    # which is exactly where a clamping filter would go wrong.
    loud = (speech * 3 / speech.abs().max()).clamp(-0.99, 0.99)
    emphasised = signal.lfilter([1, -0.97], [1], loud.numpy().astype(np.float64))
    assert np.abs(emphasised).max() > 1.0

    ours = audio.melspectrogram(loud).numpy()
    ref = reference_mel(loud.numpy().astype(np.float64))
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"max abs difference {err:.2e}"

    # The trap this guards against would indeed be visible.
    clamped = torchaudio.functional.lfilter(
        loud, torch.tensor([1.0, 0.0]), torch.tensor([1.0, -0.97]), clamp=True
    )
    assert (clamped - torchaudio.functional.preemphasis(loud, 0.97)).abs().max() > 0.1


def test_silence_is_floor() -> None:
    mel = audio.melspectrogram(torch.zeros(16000))
    assert mel.shape == (80, 81)
    assert torch.isfinite(mel).all()
    assert torch.all(mel == -audio.MAX_ABS)


@pytest.mark.parametrize("n", [401, 1000, 3199, 3200, 16001])
def test_frame_count(n: int) -> None:
    wav = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    mel = audio.melspectrogram(wav)
    assert mel.shape == (audio.N_MELS, 1 + n // 200) == (80, audio.num_mel_frames(n))
    assert mel.dtype == torch.float32


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="1-D"):
        audio.melspectrogram(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match="too short"):
        audio.melspectrogram(torch.zeros(400))


def test_load_stereo_44k1(samples_dir: Path) -> None:
    wav = audio.load_audio(samples_dir / "aud_retalking1_44k1_stereo.wav")
    expected = 221184 * 16000 / 44100  # samples in the source file, at 16 kHz
    assert wav.dim() == 1 and wav.dtype == torch.float32
    assert abs(len(wav) - expected) <= 2, len(wav)
    assert 0.01 < wav.abs().max() <= 1.0


def test_load_aac_in_mp4(samples_dir: Path) -> None:
    wav = audio.load_audio(samples_dir / "vid_retalking2_844sq_25fps.mp4")
    assert abs(len(wav) / 16000 - 5.02) < 0.05


def test_save_wav_round_trip(tmp_path: Path) -> None:
    t = torch.arange(8000) / 16000
    wav = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    audio.save_wav(tmp_path / "a.wav", wav)
    back = audio.load_audio(tmp_path / "a.wav")
    assert len(back) == len(wav)
    assert (back - wav).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("name", "match"),
    [("missing.wav", "not found"), ("photo.jpg", "no audio stream"), ("junk.mp3", "decode")],
)
def test_load_errors_are_one_line(tmp_path: Path, name: str, match: str) -> None:
    path = tmp_path / name
    if name == "photo.jpg":
        import cv2

        cv2.imwrite(str(path), np.zeros((32, 32, 3), np.uint8))
    elif name == "junk.mp3":
        path.write_bytes(b"\xff\xfb" + bytes(range(256)) * 8)
    with pytest.raises(audio.AudioError, match=match) as info:
        audio.load_audio(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


# --- resampled input, formats, silence ---------------------------------------------------------


def read_pcm16(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float64 in [-1, 1] and the rate, read without FFmpeg."""
    import wave

    with wave.open(str(path)) as wav:
        raw = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        return raw.reshape(-1, wav.getnchannels()) / 32768.0, wav.getframerate()


@pytest.mark.parametrize(
    ("name", "up", "down"),
    [("aud_retalking1_44k1_stereo.wav", 160, 441), ("aud_retalking2_48k_stereo.wav", 1, 3)],
)
def test_resampled_stereo_matches_reference(
    samples_dir: Path, name: str, up: int, down: int
) -> None:
    # Ours: PyAV decode + libswresample + channel mean. Reference: plain channel mean and scipy's
    # polyphase resampler. Resamplers legitimately differ near the 7.6 kHz top band, so bins
    # 70-79 and the two edge frames on each side are left out.
    path = samples_dir / name
    ours = audio.load_audio(path).numpy()
    pcm, rate = read_pcm16(path)
    ref = signal.resample_poly(pcm.mean(axis=1), up, down)
    assert rate * up // down == 16000 and abs(len(ours) - len(ref)) <= 2
    n = min(len(ours), len(ref))
    diff = np.abs(audio.melspectrogram(ours[:n]).numpy() - reference_mel(ref[:n]))[:70, 2:-2]
    assert diff.mean() <= 0.015 and diff.max() <= 0.1, (diff.mean(), diff.max())


def _tone(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * 440 * t)


def test_wav_24bit_stereo_downmixes_to_the_mean(tmp_path: Path) -> None:
    import wave

    left = _tone(48000)
    pcm = np.stack([left, np.zeros_like(left)], axis=1)  # mean = half the tone
    ints = np.round(pcm * (2**23 - 1)).astype("<i4")
    packed = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()  # little-endian 24-bit
    with wave.open(str(tmp_path / "a.wav"), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(3)
        out.setframerate(48000)
        out.writeframes(packed)
    wav = audio.load_audio(tmp_path / "a.wav").numpy()
    ref = signal.resample_poly(pcm.mean(axis=1), 1, 3)
    assert abs(len(wav) - 16000) <= 1
    n = min(len(wav), len(ref))
    assert np.abs(wav[100:n - 100] - ref[100:n - 100]).max() < 2e-3


def test_mp3_decodes_at_16k(tmp_path: Path) -> None:
    import av

    tone = _tone(44100).astype(np.float32)
    with av.open(str(tmp_path / "a.mp3"), "w") as out:
        stream = out.add_stream("libmp3lame", rate=44100)
        stream.layout = "mono"
        for start in range(0, len(tone), 1152):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1152], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 44100, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    wav = audio.load_audio(tmp_path / "a.mp3").numpy()
    assert abs(len(wav) - 16000) <= 16  # within 1 ms: encoder padding is trimmed
    ref = signal.resample_poly(tone.astype(np.float64), 160, 441)
    n = min(len(wav), len(ref))
    corr = np.corrcoef(wav[800:n - 800], ref[800:n - 800])[0, 1]
    assert corr > 0.99, corr


@pytest.mark.parametrize("level", [0.0, 1e-9, 1e-6])
def test_silence_and_near_silence_give_finite_floor_mels(level: float) -> None:
    wav = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * level
    mel = audio.melspectrogram(wav)
    assert torch.isfinite(mel).all() and mel.min() >= -audio.MAX_ABS
    assert mel.max() < -3.0  # at or near the -100 dB floor


def test_decode_audio_reports_start_time(tmp_path: Path) -> None:
    audio.save_wav(tmp_path / "a.wav", torch.zeros(8000))
    wav, start = audio.decode_audio(tmp_path / "a.wav")
    assert len(wav) == 8000 and start == 0.0
