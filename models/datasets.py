"""The training examples' data, all real and downloaded from nowhere: scikit-learn's bundled 8×8
digits, and spoken digit names synthesised by Debian's espeak-ng.

- :func:`load_digits`: the digits split 80/20, upsampled to 32×32 RGB (classification);
- :class:`SoundImagePairs`: "zero" … "nine" spoken by several espeak-ng voices at several speeds and
  pitches, each clip paired with a digit image of the same class (sound-image fusion);
- :class:`DigitScenes`: canvases holding several digits at random positions and sizes, with their
  boxes (detection).

Each data set hands out augmented training batches through ``train_batch(index, generator)``, every
random draw taken from ``generator`` on the CPU, so two runs from one seed see the same batches;
``probe()`` gives two held-out inputs for one cheap forward.
"""
from __future__ import annotations

import io
import itertools
import math
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .multimodal import DIGIT_NAMES

SEED = 0
IMAGE_SIZE = 32


# --- scikit-learn's digits ----------------------------------------------------------------------

def split_digits(test_size: float = 0.2, seed: int = SEED) -> tuple[torch.Tensor, ...]:
    """The 1797 digits as (N, 8, 8) floats in [0, 1] and their labels, split stratified and seeded
    (80/20: 1437 train, 360 test): (train images, train labels, test images, test labels)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    split = train_test_split(data.images, data.target, test_size=test_size, stratify=data.target, random_state=seed)
    train_x, test_x, train_y, test_y = (torch.as_tensor(a) for a in split)
    return train_x.float() / 16, train_y, test_x.float() / 16, test_y


@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 3, 32, 32), normalized with the training set's mean and std
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def train_size(self) -> int:
        return len(self.train_x)

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(self.train_x[index], generator), self.train_y[index]

    def probe(self) -> tuple[torch.Tensor]:
        return (self.test_x[:2],)

    def describe(self) -> str:
        return f"{len(self.train_x)} train / {len(self.test_x)} test images, 8×8 upsampled to 32×32"


def load_digits(device: torch.device | str = "cpu", test_size: float = 0.2, seed: int = SEED) -> Digits:
    """:func:`split_digits`, bilinearly upsampled from 8×8 to 32×32, repeated to 3 channels and
    standardised with the training images' mean and std."""
    train_x, train_y, test_x, test_y = split_digits(test_size, seed)
    images = [F.interpolate(x.unsqueeze(1), size=IMAGE_SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
              for x in (train_x, test_x)]
    mean, std = images[0].mean(), images[0].std()
    train_x, test_x = ((x - mean) / std for x in images)
    return Digits(*(t.to(device) for t in (train_x, train_y, test_x, test_y)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warps (±10° rotation, ±10% scale, ±2 px shift), border-padded: 1437
    images are few for a ViT. Drawn from ``generator`` on the CPU so both runs see the same ones."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / IMAGE_SIZE)  # grid units: 2 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


# --- spoken digits (espeak-ng) ------------------------------------------------------------------

ESPEAK_RATE = 22050  # Hz, espeak-ng's output
SAMPLE_RATE = ESPEAK_RATE // 2  # what the models hear: speech needs no more than 5.5 kHz here
CLIP_SAMPLES = 8192  # 0.74 s at 11025 Hz: the longest word ("seven" at 130 words/minute) fits
# espeak-ng voices (language + variant: male, female and Klatt-synthesised), speeds in words per
# minute and pitches (0-99): 8 × 4 × 4 × 10 words = 1280 clips.
VOICES = ("en-us", "en-us+f2", "en-gb-scotland+m3", "en-gb-x-rp+f4", "en-029+m7", "en-us-nyc+f3", "en+klatt",
          "en-gb-x-gbclan+f5")
SPEEDS = (130, 160, 190, 220)
PITCHES = (30, 45, 60, 75)


class DataUnavailable(RuntimeError):
    """A data set cannot be made on this machine; the message says why and how to fix it."""


def espeak_missing() -> str | None:
    """Why spoken digits cannot be synthesised here, or None when espeak-ng is installed."""
    if shutil.which("espeak-ng") is None:
        return "espeak-ng is not installed (on Debian or Ubuntu: apt-get install espeak-ng)"
    return None


def speak(word: str, voice: str, speed: int, pitch: int) -> torch.Tensor:
    """One word from espeak-ng: its 22050 Hz mono 16-bit WAV as floats in [-1, 1]."""
    command = ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), word]
    data = subprocess.run(command, check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(data)) as clip:
        if (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) != (ESPEAK_RATE, 1, 2):
            raise RuntimeError(f"espeak-ng gave {clip.getframerate()} Hz, {clip.getnchannels()} channels, "
                               f"{8 * clip.getsampwidth()} bits; expected {ESPEAK_RATE} Hz mono 16-bit")
        # Written to a pipe, the header's length is a placeholder: read up to the end of the data.
        frames = clip.readframes(clip.getnframes())
    return torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768


def fit_clip(waveform: torch.Tensor) -> torch.Tensor:
    """A 22050 Hz utterance as a (CLIP_SAMPLES,) clip at 11025 Hz: pairs of samples averaged (a
    crude low-pass before dropping every other one), silence trimmed, centred, peak at 1."""
    x = waveform[: len(waveform) // 2 * 2].view(-1, 2).mean(dim=1)
    loud = (x.abs() > 0.02 * x.abs().max()).nonzero().flatten()
    x = x[loud[0]: loud[-1] + 1]
    start = max(0, (len(x) - CLIP_SAMPLES) // 2)
    x = x[start: start + CLIP_SAMPLES]
    left = (CLIP_SAMPLES - len(x)) // 2
    return F.pad(x, (left, CLIP_SAMPLES - len(x) - left)) / x.abs().max()


def spoken_digits(cache: Path | None = None) -> dict[str, torch.Tensor]:
    """Every (word, voice, speed, pitch) of the grid above: ``clips`` (1280, CLIP_SAMPLES) and the
    ``label``, ``voice``, ``speed`` and ``pitch`` index of each. Synthesised once (about 10 s on two
    cores), then read from ``cache`` (a .pt file) when it holds the same grid. Raises
    :class:`DataUnavailable` when there is no such cache and espeak-ng is missing."""
    grid = {"voices": VOICES, "speeds": SPEEDS, "pitches": PITCHES, "samples": CLIP_SAMPLES}
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        if saved["grid"] == grid:
            return {key: value.float() if key == "clips" else value for key, value in saved["data"].items()}
    if (reason := espeak_missing()) is not None:
        raise DataUnavailable(reason)
    combos = list(itertools.product(range(10), range(len(VOICES)), range(len(SPEEDS)), range(len(PITCHES))))

    def clip(combo):
        word, voice, speed, pitch = combo
        return fit_clip(speak(DIGIT_NAMES[word], VOICES[voice], SPEEDS[speed], PITCHES[pitch]))

    with ThreadPoolExecutor(max_workers=2) as pool:  # espeak-ng runs in its own processes
        clips = list(pool.map(clip, combos))
    index = torch.tensor(combos)
    data = {"clips": torch.stack(clips), **{key: index[:, i] for i, key in enumerate(("label", "voice", "speed", "pitch"))}}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"grid": grid, "data": {**data, "clips": data["clips"].half()}}, cache)  # half: 21 MB
    return data


def noise_images(images: torch.Tensor, std: float, generator: torch.Generator, resolution: int = 8) -> torch.Tensor:
    """Gaussian noise drawn at the digits' own 8×8 resolution, upsampled bilinearly as the digits
    were, the same in every channel, scaled to ``std`` (the standardised pixels' own std is 1).
    Independent noise per 32×32 pixel would be averaged away by the first conv: at std 4 a SeedCNN
    still read 65% of the held-out digits; with this noise at std 3, 26% (trained on clean images)."""
    noise = torch.randn(len(images), 1, resolution, resolution, generator=generator)
    noise = F.interpolate(noise, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return images + (std / noise.std()) * noise.to(images.device)


def noise_audio(waveform: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """White noise at a signal-to-noise ratio of ``snr_db`` decibels per clip (RMS against RMS)."""
    rms = waveform.square().mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(waveform.shape, generator=generator).to(waveform.device)
    return waveform + noise * rms * 10 ** (-snr_db / 20)


def same_class_picks(labels: torch.Tensor, pool_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each label, the index of a uniformly drawn element of ``pool_labels`` with that label."""
    order = torch.argsort(pool_labels.cpu(), stable=True)
    counts = torch.bincount(pool_labels.cpu(), minlength=int(labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    labels = labels.cpu()
    offsets = (torch.rand(len(labels), generator=generator) * counts[labels]).long()
    return order[starts[labels] + offsets].to(pool_labels.device)


def stretch_and_shift(waveform: torch.Tensor, stretch: float, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each clip resampled about its middle by a factor in 1 ± ``stretch`` and moved by up to
    ``shift`` samples (linear interpolation; silence where it reads beyond the clip)."""
    count, samples = waveform.shape
    factor = 1 + (torch.rand(count, 1, generator=generator) * 2 - 1) * stretch
    moved = torch.randint(-shift, shift + 1, (count, 1), generator=generator)
    centre = (samples - 1) / 2
    source = (torch.arange(samples) - centre) * factor + centre - moved  # (count, samples): where each sample reads
    x = (2 * source + 1) / samples - 1  # grid_sample's coordinates (align_corners=False): sample i's centre at (2i+1)/n - 1
    grid = torch.stack([x, torch.zeros_like(x)], dim=-1)[:, None].to(waveform.device)
    return F.grid_sample(waveform[:, None, None], grid, align_corners=False, padding_mode="zeros")[:, 0, 0]


CLEAN, IMAGE_NOISED, AUDIO_NOISED = 0, 1, 2


@dataclass
class SoundImagePairs:
    """Spoken digits paired with digit images of the same class.

    Held out: every clip of 8 of the 32 (voice, speed) combinations, each voice at one speed (all
    pitches), paired once (seeded) with held-out images; training clips get a fresh training image
    of their class in every batch. ``noised_test()`` is the noised evaluation: each held-out pair
    with heavy noise on exactly one modality, the image for one half of the pairs (a seeded half)
    and the sound for the other. Training batches noise one modality of a quarter of the pairs each
    (``corrupted`` says which), at the same heavy levels.
    """

    train_audio: torch.Tensor  # (N, CLIP_SAMPLES)
    train_y: torch.Tensor
    test_audio: torch.Tensor
    test_y: torch.Tensor
    test_images: torch.Tensor  # (N_test, 3, 32, 32), paired with test_audio
    images: Digits  # the training images to pair with
    image_noise: float = 3.0  # noise std, in units of the pixels' std (see noise_images)
    audio_snr_db: float = -10.0

    @classmethod
    def build(cls, spoken: dict[str, torch.Tensor], images: Digits, seed: int = SEED) -> SoundImagePairs:
        held_out = spoken["speed"] == spoken["voice"] % len(SPEEDS)
        generator = torch.Generator().manual_seed(seed)
        test_y = spoken["label"][held_out].to(images.test_y.device)
        test_images = images.test_x[same_class_picks(test_y, images.test_y, generator)]
        device = images.train_x.device
        return cls(spoken["clips"][~held_out].to(device), spoken["label"][~held_out].to(device),
                   spoken["clips"][held_out].to(device), test_y, test_images, images)

    @property
    def train_size(self) -> int:
        return len(self.train_audio)

    def corrupt(self, audio: torch.Tensor, images: torch.Tensor, corrupted: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Heavy noise on the images where ``corrupted == IMAGE_NOISED``, on the sound where AUDIO_NOISED."""
        noised_images = noise_images(images, self.image_noise, generator)
        noised_audio = noise_audio(audio, self.audio_snr_db, generator)
        images = torch.where((corrupted == IMAGE_NOISED).view(-1, 1, 1, 1), noised_images, images)
        audio = torch.where((corrupted == AUDIO_NOISED).view(-1, 1), noised_audio, audio)
        return audio, images

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(sounds, images, labels, corrupted): each clip stretched in time by up to ±15% (speech
        faster or slower, and higher or lower) and shifted by up to ±0.1 s, with an augmented
        training image of its class."""
        labels = self.train_y[index]
        audio = stretch_and_shift(self.train_audio[index], 0.15, SAMPLE_RATE // 10, generator)
        images = augment(self.images.train_x[same_class_picks(labels, self.images.train_y, generator)], generator)
        # A quarter of the pairs noise the image, a quarter the sound, half stay clean.
        draws = torch.randint(4, (len(index),), generator=generator)
        corrupted = torch.tensor([CLEAN, CLEAN, IMAGE_NOISED, AUDIO_NOISED])[draws].to(labels.device)
        return (*self.corrupt(audio, images, corrupted, generator), labels, corrupted)

    def noised_test(self, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sounds, images, corrupted): the held-out pairs, half with the image noised, half the sound."""
        generator = torch.Generator().manual_seed(seed)
        corrupted = torch.full((len(self.test_y),), AUDIO_NOISED)
        corrupted[torch.randperm(len(self.test_y), generator=generator)[: len(self.test_y) // 2]] = IMAGE_NOISED
        corrupted = corrupted.to(self.test_y.device)
        return (*self.corrupt(self.test_audio, self.test_images, corrupted, generator), corrupted)

    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_audio[:2], self.test_images[:2]

    def describe(self) -> str:
        return (f"{len(self.train_audio)} train / {len(self.test_audio)} held-out clips of "
                f"{CLIP_SAMPLES / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz (held out: {len(VOICES)} of the "
                f"{len(VOICES) * len(SPEEDS)} voice/speed combinations), paired with {len(self.images.train_x)} train / "
                f"{len(self.test_images)} held-out images")


# --- scenes for detection -----------------------------------------------------------------------

def ink_box(digit: torch.Tensor) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of an 8×8 digit's nonzero pixels, in pixel edges (x2, y2 exclusive)."""
    rows, cols = digit.gt(0).any(dim=1).nonzero().flatten(), digit.gt(0).any(dim=0).nonzero().flatten()
    return cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1


def compose_scenes(digits: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator,
                   canvas: int = 64, sizes: tuple[int, int] = (12, 24), per_scene: tuple[int, int] = (2, 4),
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``count`` scenes, (count, 1, canvas, canvas) in [0, 1], each with ``per_scene`` digits (a
    range, inclusive) drawn from ``digits`` (N, 8, 8), each scaled to a square of a size in ``sizes``
    (inclusive) and placed where its box overlaps no other; a digit that finds no place in 20 tries
    is left out. Boxes are (x1, y1, x2, y2) around each digit's ink, in pixels."""
    images = torch.zeros(count, 1, canvas, canvas)
    boxes, classes = [], []
    draw = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=generator))  # noqa: E731
    for scene in range(count):
        placed: list[tuple[float, float, float, float]] = []
        kinds: list[int] = []
        for _ in range(draw(*per_scene)):
            for _attempt in range(20):
                pick, size = draw(0, len(digits) - 1), draw(*sizes)
                x0, y0 = draw(0, canvas - size), draw(0, canvas - size)
                x1, y1, x2, y2 = (v * size / 8 for v in ink_box(digits[pick]))
                box = (x0 + x1, y0 + y1, x0 + x2, y0 + y2)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    patch = F.interpolate(digits[pick][None, None], size=(size, size), mode="bilinear", align_corners=False)
                    region = images[scene, :, y0:y0 + size, x0:x0 + size]
                    torch.maximum(region, patch[0].clamp(0, 1), out=region)
                    placed.append(box)
                    kinds.append(int(labels[pick]))
                    break
        boxes.append(torch.tensor(placed, dtype=torch.float32).view(-1, 4))
        classes.append(torch.tensor(kinds, dtype=torch.long))
    return images, boxes, classes


# Pixel mean and standard deviation of the scenes (300 held-out scenes measured: 0.075, 0.207).
SCENE_MEAN, SCENE_STD = 0.075, 0.21


@dataclass
class DigitScenes:
    """Detection scenes: 64×64 canvases with 2-4 digits of 12-24 px. Training scenes are composed
    afresh for every batch from the training digits (an epoch is ``train_size`` scenes); the
    ``test_*`` scenes are composed once (seeded) from the held-out digits."""

    train_digits: torch.Tensor  # (N, 8, 8) in [0, 1]
    train_labels: torch.Tensor
    test_images: torch.Tensor  # (M, 1, 64, 64)
    test_boxes: list[torch.Tensor]  # (k, 4) per scene
    test_labels: list[torch.Tensor]
    train_size: int = 2048

    @classmethod
    def build(cls, device: torch.device | str = "cpu", test_scenes: int = 300, seed: int = SEED) -> DigitScenes:
        train_x, train_y, test_x, test_y = split_digits(seed=seed)
        images, boxes, labels = compose_scenes(test_x, test_y, test_scenes, torch.Generator().manual_seed(seed))
        return cls(train_x, train_y, images.to(device), [b.to(device) for b in boxes], [c.to(device) for c in labels])

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple:
        """(images, boxes per scene, labels per scene) of len(index) new scenes."""
        device = self.test_images.device
        images, boxes, labels = compose_scenes(self.train_digits, self.train_labels, len(index), generator)
        return images.to(device), [b.to(device) for b in boxes], [c.to(device) for c in labels]

    def probe(self) -> tuple[torch.Tensor]:
        return (self.test_images[:2],)

    def describe(self) -> str:
        return (f"{self.train_size} fresh training scenes per epoch from {len(self.train_digits)} digits, "
                f"{len(self.test_images)} held-out scenes with {sum(len(b) for b in self.test_boxes)} digits")
