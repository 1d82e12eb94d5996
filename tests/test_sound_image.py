"""Sound-image fusion: the log-mel front end, the spectrogram CNN, SoundImageFusion on the kernel
backends against float64 (outputs, gradients, three training steps), and the spoken-digit data (built
from synthetic tones here: only test_espeak_speaks needs espeak-ng).

Tiny configs: without a GPU the Triton kernels run through the interpreter.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from support import (
    KERNEL_BACKENDS, as_dtype_of, assert_as_accurate_as_stock, assert_trains_like_float64, device_for, relative_error,
)
from vkernels.models import SeedCNN, SoundImageFusion, SpectrogramCNN, VisionTransformer
from vkernels.models import datasets
from vkernels.models.audio import LogMelSpectrogram, mel_filterbank, mel_to_hz

# 256 samples at 8 kHz → 9 frames of 8 mels → after two 2×2 pools, 2×2 = 4 sound tokens.
TINY_AUDIO = dict(channels=(4, 8), sample_rate=8000, n_fft=64, hop_length=32, n_mels=8)
SAMPLES = 256


def tiny_fusion(device, visual="vit"):
    """The image tower is a ViT (5 tokens of 8×8 images) or a SeedCNN (18×18 images, one 1×1 feature
    map: one token). The kernel tests take the ViT: SeedCNN's convs cost seconds each in the Triton
    interpreter, and SeedCNN is tested on the kernels in test_models.py."""
    audio = SpectrogramCNN(5, **TINY_AUDIO)
    if visual == "vit":
        visual = VisionTransformer(8, 4, num_classes=5, embed_dim=16, depth=1, num_heads=2)
    else:
        visual = SeedCNN(5, channels=(4, 8, 8), hidden=16, image_size=18)
    return SoundImageFusion(5, audio, visual, dim=16, num_heads=2, depth=1).to(device)


# --- log-mel front end -----------------------------------------------------------------------

def test_mel_filterbank_is_a_partition_of_unity_between_the_first_and_last_centre():
    bank = mel_filterbank(257, 20, 16000, f_min=50.0, f_max=7000.0).double()
    assert bank.shape == (257, 20) and bank.min() >= 0
    mels = torch.linspace(2595 * math.log10(1 + 50 / 700), 2595 * math.log10(1 + 7000 / 700), 22, dtype=torch.float64)
    centres = mel_to_hz(mels)[1:-1]
    freqs = torch.linspace(0, 8000, 257, dtype=torch.float64)
    inner = (freqs >= centres[0]) & (freqs <= centres[-1])
    # Neighbouring triangles cross linearly between centres: they sum to 1 there, and are 0 beyond the edges.
    assert torch.allclose(bank[inner].sum(dim=1), torch.ones(int(inner.sum()), dtype=torch.float64), atol=1e-6)
    assert bank[freqs > 7000.0].abs().max() == 0 and bank[freqs < 50.0].abs().max() == 0
    peaks = freqs[bank.argmax(dim=0)]
    assert (peaks - centres).abs().max() <= 8000 / 256 / 2 + 1e-9  # each filter peaks at the bin nearest its centre
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(257, 20, 16000, f_max=9000.0)


def test_log_mel_finds_a_tone_and_ignores_the_level():
    sample_rate, n_mels = 11025, 32
    mel = LogMelSpectrogram(sample_rate, n_fft=256, hop_length=128, n_mels=n_mels)
    frequency = 300 + 2500 * torch.rand(()).item()
    t = torch.arange(8192) / sample_rate
    tone = torch.sin(2 * math.pi * frequency * t + 6.28 * torch.rand(()).item())[None]
    spectrogram = mel(tone)
    assert spectrogram.shape == (1, 1, n_mels, 1 + 8192 // 128)
    assert abs(spectrogram.mean().item()) < 1e-5 and abs(spectrogram.std().item() - 1) < 1e-3  # standardised per clip
    centres = mel_to_hz(torch.linspace(0, 2595 * math.log10(1 + sample_rate / 2 / 700), n_mels + 2))[1:-1]
    loudest = spectrogram[0, 0].mean(dim=1).argmax()
    assert loudest == (centres - frequency).abs().argmin()
    # The level divides out where the power is far above the 1e-6 floor: in every bin for white noise.
    noise = torch.randn(1, 8192)
    assert relative_error(mel(noise * 0.1), mel(noise)) < 1e-4
    with pytest.raises(ValueError, match="batch, samples"):
        mel(tone[0])


# --- the models ------------------------------------------------------------------------------

def test_spectrogram_cnn_and_fusion_shapes():
    audio = SpectrogramCNN(10)  # 8192 samples at 11025 Hz: 32 mels × 65 frames → 4 × 8 tokens of 64
    wave = torch.randn(2, 8192)
    assert audio.forward_features(wave).shape == (2, 32, 64) and audio(wave).shape == (2, 10)
    with pytest.raises(ValueError, match="n_mels"):
        SpectrogramCNN(n_mels=4, channels=(4, 4, 4))
    model = SoundImageFusion(10, audio, backend="torch")
    logits = model.logits_per_modality(wave, torch.randn(2, 3, 32, 32))
    assert {k: v.shape for k, v in logits.items()} == {k: (2, 10) for k in ("fused", "audio", "image")}


@pytest.mark.parametrize("visual", ["cnn", "vit"])
def test_each_tower_works_alone_and_follows_the_backend(visual):
    model = tiny_fusion("cpu", visual)
    model.backend = "torch"
    assert model.audio.backend == model.visual.backend == "torch"
    size = 18 if visual == "cnn" else 8
    wave, images = torch.randn(3, SAMPLES), torch.randn(3, 3, size, size)
    logits = model.logits_per_modality(wave, images)
    assert torch.equal(logits["audio"], model.audio(wave))
    assert torch.equal(logits["image"], model.visual(images))
    assert torch.equal(logits["fused"], model(wave, images))
    # The fusion reads both modalities: changing either changes the fused logits.
    assert not torch.allclose(model(wave, images), model(wave.flip(0), images))
    assert not torch.allclose(model(wave, images), model(wave, images.flip(0)))


def fusion_loss(model, wave, images, labels):
    wave, images = as_dtype_of(model, wave, images)
    return sum(F.cross_entropy(logits, labels) for logits in model.logits_per_modality(wave, images).values())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fusion_as_accurate_as_stock_with_gradients(backend):
    """Every logit (fused, sound, image) and parameter gradient within max(2 × stock float32's error,
    1e-5) of float64. Measured over 3 seeds: both float32 runs <= 4e-7 (logits), <= 1.6e-6 (gradients)."""
    device = device_for(backend)
    model = tiny_fusion(device)
    wave, images = torch.randn(2, SAMPLES, device=device), torch.randn(2, 3, 8, 8, device=device)

    def run(m):
        return tuple(m.logits_per_modality(*as_dtype_of(m, wave, images)).values())

    assert_as_accurate_as_stock(model, run, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fusion_convergence_vs_float64(backend):
    """Three SGD steps: the kernels' loss at every step within 1e-4 of float64's, its final parameters as
    close to float64's as stock float32's. Measured over 4 seeds: stock float32 and Triton losses
    <= 7e-8 from float64, parameters <= 8e-7 (under the 1e-5 floor)."""
    device = device_for(backend)
    model = tiny_fusion(device)
    wave, images = torch.randn(2, SAMPLES, device=device), torch.randn(2, 3, 8, 8, device=device)
    labels = torch.randint(0, 5, (2,), device=device)
    assert_trains_like_float64(model, lambda m: fusion_loss(m, wave, images, labels), backend=backend, lr=0.1)


# --- the data --------------------------------------------------------------------------------

def fake_speak(word, voice, speed, pitch):
    """A stand-in for espeak-ng: a tone per word (its pitch moved by the voice and pitch), as long as
    the speed makes it, at espeak-ng's rate, with silence around it."""
    seconds = 0.6 * 130 / speed
    frequency = 200 + 120 * datasets.DIGIT_NAMES.index(word) + 7 * datasets.VOICES.index(voice) + pitch
    t = torch.arange(int(seconds * datasets.ESPEAK_RATE)) / datasets.ESPEAK_RATE
    return F.pad(0.5 * torch.sin(2 * math.pi * frequency * t), (500, 3000))


@pytest.fixture(scope="module")
def synthetic_spoken():
    """The spoken-digit grid from fake_speak, through the real synthesis path (espeak-ng not needed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "speak", fake_speak)
        patch.setattr(datasets, "espeak_missing", lambda: None)
        return datasets.spoken_digits()


def random_digit_images():
    """Stand-ins for load_digits(): 50 training and 20 held-out random images, labels 0..9 in turn."""
    return datasets.Digits(torch.randn(50, 3, 32, 32), torch.arange(50) % 10, torch.randn(20, 3, 32, 32), torch.arange(20) % 10)


def test_fit_clip_trims_centres_and_normalises():
    t = torch.arange(4000) / datasets.ESPEAK_RATE
    word = 0.3 * torch.sin(2 * math.pi * 440 * t)
    clip = datasets.fit_clip(F.pad(word, (1000, 7000)))
    assert clip.shape == (datasets.CLIP_SAMPLES,) and clip.abs().max() == 1
    loud = (clip.abs() > 0.02).nonzero().flatten()
    # 4000 samples at 22050 Hz are 2000 at 11025 Hz, centred: as much silence before as after
    assert abs(loud[-1] - loud[0] + 1 - 2000) <= 4
    assert abs(loud[0] - (datasets.CLIP_SAMPLES - 1 - loud[-1])) <= 4
    long = datasets.fit_clip(torch.sin(torch.arange(30000) * 0.1))  # longer than a clip: its middle
    assert long.shape == (datasets.CLIP_SAMPLES,)


def test_spoken_digits_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "speak", fake_speak)
    monkeypatch.setattr(datasets, "espeak_missing", lambda: None)
    monkeypatch.setattr(datasets, "VOICES", datasets.VOICES[:2])  # a small grid: 2 voices × 2 speeds × 10 words
    monkeypatch.setattr(datasets, "SPEEDS", datasets.SPEEDS[:2])
    pitches = datasets.PITCHES
    monkeypatch.setattr(datasets, "PITCHES", pitches[:1])
    cache = tmp_path / "spoken.pt"
    first = datasets.spoken_digits(cache)
    assert first["clips"].shape == (40, datasets.CLIP_SAMPLES) and torch.bincount(first["label"]).tolist() == [4] * 10
    monkeypatch.setattr(datasets, "espeak_missing", lambda: "no espeak-ng here")
    again = datasets.spoken_digits(cache)  # from the cache: no espeak-ng needed
    assert torch.allclose(again["clips"], first["clips"], atol=1e-3) and torch.equal(again["speed"], first["speed"])
    with pytest.raises(datasets.DataUnavailable, match="no espeak-ng here"):
        datasets.spoken_digits(tmp_path / "elsewhere.pt")
    monkeypatch.setattr(datasets, "PITCHES", pitches[:2])
    with pytest.raises(datasets.DataUnavailable):  # a cache of another grid is not used
        datasets.spoken_digits(cache)


def test_held_out_split_by_voice_and_speed(synthetic_spoken):
    spoken = synthetic_spoken
    grid = (10, len(datasets.VOICES), len(datasets.SPEEDS), len(datasets.PITCHES))
    assert spoken["clips"].shape == (math.prod(grid), datasets.CLIP_SAMPLES)
    images = random_digit_images()
    pairs = datasets.SoundImagePairs.build(spoken, images)
    combos = lambda voice, speed: set(zip(voice.tolist(), speed.tolist()))  # noqa: E731
    held_out = spoken["speed"] == spoken["voice"] % len(datasets.SPEEDS)
    test_combos = combos(spoken["voice"][held_out], spoken["speed"][held_out])
    assert len(test_combos) == len(datasets.VOICES)  # one speed per voice, all pitches and words
    assert not test_combos & combos(spoken["voice"][~held_out], spoken["speed"][~held_out])
    assert len(pairs.test_audio) == 10 * len(datasets.VOICES) * len(datasets.PITCHES)
    # each held-out clip is paired with a held-out image of its class
    same = (pairs.test_images[:, None] == images.test_x[None]).flatten(2).all(dim=2)  # (pairs, held-out images)
    assert torch.equal(same.sum(dim=1), torch.ones(len(same), dtype=torch.long))
    assert torch.equal(images.test_y[same.float().argmax(dim=1)], pairs.test_y)


def test_sound_image_batches_and_noised_evaluation(synthetic_spoken):
    images = random_digit_images()
    pairs = datasets.SoundImagePairs.build(synthetic_spoken, images)
    generator = torch.Generator().manual_seed(torch.randint(2**31, ()).item())
    audio, batch_images, labels, corrupted = pairs.train_batch(torch.arange(200), generator)
    assert audio.shape == (200, datasets.CLIP_SAMPLES) and batch_images.shape == (200, 3, 32, 32)
    assert torch.equal(labels, pairs.train_y[:200])
    assert set(corrupted.tolist()) == {datasets.CLEAN, datasets.IMAGE_NOISED, datasets.AUDIO_NOISED}
    assert (corrupted == datasets.CLEAN).float().mean() > 0.3  # half clean, a quarter each noised
    picks = datasets.same_class_picks(labels, images.train_y, generator)
    assert torch.equal(images.train_y[picks], labels)

    noised_audio, noised_images, which = pairs.noised_test()
    assert (which == datasets.IMAGE_NOISED).sum() == len(which) // 2 and (which != datasets.CLEAN).all()
    image_changed = (noised_images != pairs.test_images).flatten(1).any(dim=1)
    audio_changed = (noised_audio != pairs.test_audio).any(dim=1)
    assert torch.equal(image_changed, which == datasets.IMAGE_NOISED)
    assert torch.equal(audio_changed, which == datasets.AUDIO_NOISED)
    # the sound's noise is at the stated signal-to-noise ratio
    noise = (noised_audio - pairs.test_audio)[audio_changed]
    snr = 10 * torch.log10(pairs.test_audio[audio_changed].square().mean(1) / noise.square().mean(1))
    assert (snr - pairs.audio_snr_db).abs().max() < 0.5


def test_espeak_speaks():
    """The only test that needs espeak-ng: one real word through the real synthesiser."""
    reason = datasets.espeak_missing()
    if reason is not None:
        pytest.skip(reason)
    wave = datasets.speak("seven", datasets.VOICES[1], 160, 50)
    assert 0.3 * datasets.ESPEAK_RATE < len(wave) < 2 * datasets.ESPEAK_RATE and wave.abs().max() > 0.1
    clip = datasets.fit_clip(wave)
    assert clip.shape == (datasets.CLIP_SAMPLES,) and clip[:100].abs().max() < 0.02  # silence before the word


# --- the example -----------------------------------------------------------------------------

def test_train_digits_fusion_smoke(tmp_path, monkeypatch, capsys):
    """Two steps of the example on fake_speak's clips: both runs, their figures and pictures; and
    without espeak-ng (and no cache) the example is skipped with the reason."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    from vkernels.models import train_digits

    monkeypatch.setattr(datasets, "speak", fake_speak)
    monkeypatch.setattr(datasets, "espeak_missing", lambda: None)
    results = train_digits.main(["--model", "fusion", "--max-steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    runs = results["fusion"]["runs"]
    assert (tmp_path / "cache" / "spoken_digits.pt").exists()
    assert all((tmp_path / f"fusion_{kind}.png").stat().st_size > 0 for kind in ("loss", "predictions"))
    for run in runs.values():
        assert run["steps"] == 2 and run["score"] == run["figures"][train_digits.FUSION_METRIC]
        assert len(run["figures"]) == 6 and all(0 <= value <= 1 for value in run["figures"].values())
    assert runs["stock"]["ops"] == {"conv2d_relu_maxpool2d": "torch", "conv2d_relu": "torch", "max_pool2d": "torch",
                                    "attention": "torch"}
    assert runs["vkernels"]["losses"] == runs["stock"]["losses"]  # auto on CPU is stock PyTorch, same seed

    monkeypatch.setattr(datasets, "espeak_missing", lambda: "espeak-ng is not installed (apt-get install espeak-ng)")
    assert train_digits.main(["--model", "fusion", "--out", str(tmp_path / "elsewhere"), "--device", "cpu"]) == {}
    assert "fusion: skipped (espeak-ng spoken digits + sklearn digit images: espeak-ng is not installed " \
           "(apt-get install espeak-ng))" in capsys.readouterr().out
