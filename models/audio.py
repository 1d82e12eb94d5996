"""Sound on vkernels: a log-mel spectrogram front end (``torch.stft`` and a triangular mel filterbank
built here, no torchaudio) and a CNN over the spectrogram whose conv → ReLU → max-pool blocks are
each one ``vkernels.conv2d_relu_maxpool2d``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import vkernels


def hz_to_mel(hz):
    """HTK's mel scale: 2595 · log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the HTK mel scale, unnormalised (each peaks at 1), as
    torchaudio's ``melscale_fbanks(..., norm=None, mel_scale="htk")``. Filter m rises from centre
    m-1 to centre m and falls to centre m+1; the n_mels + 2 edges are equally spaced in mels
    between ``f_min`` and ``f_max`` (default: Nyquist). Rows are the STFT's bins 0 .. sample_rate/2."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel_filterbank: need 0 <= f_min < f_max <= sample_rate / 2, got {f_min}, {f_max}, {sample_rate}")
    edges = mel_to_hz(torch.linspace(hz_to_mel(f_min).item(), hz_to_mel(f_max).item(), n_mels + 2, dtype=torch.float64))
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)[:, None]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.minimum(rising, falling).clamp_min(0).float()


class LogMelSpectrogram(nn.Module):
    """(B, T) waveforms → (B, 1, n_mels, 1 + T // hop_length) log-mel spectrograms, each standardised
    to zero mean and unit variance over its own bins, so a clip's level does not matter (where its
    power is well above the log's 1e-6 floor).

    Power STFT with a periodic Hann window (``center=True``, reflect padding), the mel filterbank,
    then log(mel + 1e-6)."""

    def __init__(self, sample_rate: int = 11025, n_fft: int = 256, hop_length: int = 128, n_mels: int = 32,
                 f_min: float = 0.0, f_max: float | None = None) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        filterbank = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.register_buffer("filterbank", filterbank, persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"LogMelSpectrogram: expected (batch, samples) waveforms, got shape {tuple(waveform.shape)}")
        spectrum = torch.stft(waveform, self.n_fft, self.hop_length, window=self.window.to(waveform.dtype),
                              center=True, return_complex=True)
        power = spectrum.real.square() + spectrum.imag.square()  # (B, n_fft // 2 + 1, frames)
        mel = torch.log(self.filterbank.to(power.dtype).t() @ power + 1e-6)
        mean = mel.mean(dim=(1, 2), keepdim=True)
        std = mel.std(dim=(1, 2), keepdim=True)
        return ((mel - mean) / (std + 1e-5)).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, n_mels={self.n_mels}"


class SpectrogramCNN(nn.Module):
    """Sound classifier: :class:`LogMelSpectrogram`, then one block per entry of ``channels``, each a
    3×3 conv (padding 1) → ReLU → 2×2 max-pool as one ``vkernels.conv2d_relu_maxpool2d``, then the
    mean over the remaining (frequency, time) positions through ``head`` (``nn.Identity`` when
    ``num_classes=0``).

    ``forward_features`` gives the positions as tokens, (B, F·T, channels[-1]), for fusion models;
    ``forward_head`` pools and classifies them. Both ``n_mels`` and the number of frames must survive
    ``len(channels)`` halvings.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32, 64),
        sample_rate: int = 11025,
        n_fft: int = 256,
        hop_length: int = 128,
        n_mels: int = 32,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if n_mels >> len(channels) < 1:
            raise ValueError(f"SpectrogramCNN: n_mels={n_mels} does not survive {len(channels)} 2x2 poolings")
        self.backend = backend
        self.spectrogram = LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels)
        widths = (1, *channels)
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(widths, widths[1:]))
        self.num_features = channels[-1]
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, waveform: torch.Tensor) -> torch.Tensor:
        x, b = self.spectrogram(waveform), self.backend
        for conv in self.convs:
            x = vkernels.conv2d_relu_maxpool2d(x, conv.weight, conv.bias, padding=1, pool_kernel_size=2, backend=b)
        return x.flatten(2).transpose(1, 2)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.mean(dim=1))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(waveform))

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"
