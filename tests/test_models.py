"""vkernels.models: each model on the Triton kernels is as accurate as itself on stock PyTorch
against the same model in float64 (forward, and gradients for the CNN and ViT), parameter names match
torchvision/timm so their weights load and give the same outputs, and a small CNN trains as
accurately on both backends.

Tiny configs throughout: the Triton interpreter costs milliseconds per output pixel of a conv.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels
from support import (
    GPU, KERNEL_BACKENDS, Branches, as_dtype_of, assert_as_accurate, assert_as_accurate_as_stock, assert_trains_like_float64,
    backends_and_dtypes, device_for, outputs_and_grads, relative_error, rounding_floor,
)
from vkernels import dispatch
from vkernels.models import (
    CLIP, DigitTokenizer, FusionClassifier, ResNet, SeedCNN, VisionTransformer, contrastive_loss, digit_prompts,
    resnet18, vit_tiny,
)

# Floor under the bound "ours within 2 x stock's error from float64": the longest sum in these tiny
# models is the CNN's first weight gradient, over 2 x 16 x 16 output positions.
FLOOR = rounding_floor(torch.float32, 2 * 16 * 16)
# Our ResNet and ViT against torchvision's and timm's, both in float64: the longest sum is a 3x3x512
# conv (ResNet-18) and the ViT's 768-wide MLP, rounded in float64.
FLOAT64_BOUND = rounding_floor(torch.float64, 3 * 3 * 512)


class KernelCalls(TorchDispatchMode):
    """Counts the vkernels ops a forward dispatches, e.g. {"conv2d_relu_triton": 3}."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "vkernels":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def forward(*inputs, compiled=False):
    """A ``run`` for support.outputs_and_grads: the model on ``inputs`` cast to its dtype, its outputs
    as a tuple. compiled: through torch.compile(fullgraph=True), which fails on any graph break."""
    def run(model):
        if compiled:
            torch._dynamo.reset()
        out = (torch.compile(model, fullgraph=True) if compiled else model)(*as_dtype_of(model, *inputs))
        return out if isinstance(out, tuple) else (out,)
    return run


def triton_calls(model, *inputs):
    """The vkernels ops one forward of the model on the Triton backend dispatches."""
    model = copy.deepcopy(model)
    model.backend = "triton"
    with torch.no_grad(), KernelCalls() as calls:
        model(*inputs)
    return calls.counts


def randomize_batch_norm(model):
    """Non-trivial running statistics and affine parameters, so that folding BN is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)


def tiny_cnn(device):
    return SeedCNN(channels=(4, 8, 8), hidden=16, image_size=18).to(device)


# --- SeedCNN ---------------------------------------------------------------------------------

def test_seed_cnn_shapes():
    model = SeedCNN(backend="torch")
    assert model.fc1.in_features == 64 * 4 * 4  # 32 → 30 → 15 → 13 → 6 → 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        SeedCNN(image_size=17)


def test_seed_cnn_triton_matches_torch_with_gradients():
    device = device_for("triton")
    model = tiny_cnn(device)
    x = torch.randn(2, 3, 18, 18, device=device)
    assert_as_accurate_as_stock(model, forward(x), floor=FLOOR)
    assert triton_calls(model, x) == {"conv2d_relu_triton": 3, "max_pool2d_triton": 2}


def test_seed_cnn_convergence_triton_vs_torch():
    """Same seed, 3 SGD steps: the loss at every step and the final parameters as close to float64's."""
    device = device_for("triton")
    x = torch.randn(2, 3, 18, 18, device=device)
    y = torch.randint(0, 10, (2,), device=device)
    assert_trains_like_float64(tiny_cnn(device), lambda model: F.cross_entropy(model(*as_dtype_of(model, x)), y),
                               floor=FLOOR)


# --- ResNet ----------------------------------------------------------------------------------

def test_resnet18_loads_torchvision_weights():
    torchvision = pytest.importorskip("torchvision")
    stock = torchvision.models.resnet18(weights=None, num_classes=10)
    ours = ResNet(layers=(2, 2, 2, 2), width=64, num_classes=10, backend="torch")
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    randomize_batch_norm(stock)
    ours.load_state_dict(stock.state_dict())
    # the same function, compared in float64: two float32 runs could round ReLU inputs near 0 apart
    stock, ours, x = stock.double(), ours.double(), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    stock.eval(), ours.eval()
    with torch.no_grad():  # eval: BN folded into fused convs
        assert relative_error(ours(x), stock(x)) <= FLOAT64_BOUND
    stock.train(), ours.train()
    assert relative_error(ours(x), stock(x)) <= FLOAT64_BOUND  # train: batch statistics, stock conv/BN
    assert relative_error(ours.layer1[0].bn1.running_mean, stock.layer1[0].bn1.running_mean) <= FLOAT64_BOUND
    assert resnet18().state_dict().keys() == torchvision.models.resnet18(weights=None).state_dict().keys()


def test_resnet_triton_matches_torch():
    device = device_for("triton")
    model = ResNet(layers=(1, 1), width=4, num_classes=5).to(device)
    randomize_batch_norm(model)
    x = torch.randn(1, 3, 16, 16, device=device)
    model.eval()
    # stem, 2 blocks × (first conv, final conv with residual); one pool each
    assert_as_accurate_as_stock(model, forward(x), floor=FLOOR, grads=False)
    assert triton_calls(model, x) == {"conv2d_relu_triton": 5, "max_pool2d_triton": 1, "adaptive_avg_pool2d_triton": 1}
    model.train()
    assert_as_accurate_as_stock(model, forward(x), floor=FLOOR, grads=False)
    assert triton_calls(model, x) == {"max_pool2d_triton": 1, "adaptive_avg_pool2d_triton": 1}


# --- ViT -------------------------------------------------------------------------------------

def tiny_vit(device, **kwargs):
    config = dict(image_size=8, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return VisionTransformer(**{**config, **kwargs}).to(device)


def test_vit_triton_matches_torch_with_gradients():
    device = device_for("triton")
    model, x = tiny_vit(device), torch.randn(2, 3, 8, 8, device=device)
    assert_as_accurate_as_stock(model, forward(x), floor=FLOOR)
    assert triton_calls(model, x) == {"attention_triton": 2}


def test_vit_any_image_and_patch_size():
    model = VisionTransformer((12, 8), (4, 2), num_classes=3, embed_dim=16, depth=1, num_heads=2, global_pool="avg")
    assert model.pos_embed.shape == (1, 1 + 3 * 4, 16)
    assert model(torch.randn(2, 3, 12, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="multiple"):
        VisionTransformer(10, 4)


def test_vit_tiny_loads_timm_weights():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = vit_tiny(num_classes=10, backend="torch").eval()
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    stock, ours, x = stock.double(), ours.double(), torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():  # the same function, compared in float64
        assert relative_error(ours(x), stock(x)) <= FLOAT64_BOUND


# --- CLIP and fusion -------------------------------------------------------------------------

TOKENIZER = DigitTokenizer(context_length=8)
TOWERS = dict(image_size=8, patch_size=4, vision_width=32, vision_depth=1, vision_heads=2,
              vocab_size=TOKENIZER.vocab_size, context_length=8, text_width=32, text_depth=1, text_heads=2)


def test_tokenizer():
    tokens = TOKENIZER(["a photo of the digit seven", "Digit 7!", "what is this blob"])
    vocab = TOKENIZER.vocab
    assert tokens[0].tolist() == [1, vocab["a"], vocab["photo"], vocab["of"], vocab["the"], vocab["digit"], vocab["seven"], TOKENIZER.eot_id]
    assert tokens[1].tolist()[:4] == [1, vocab["digit"], vocab["7"], TOKENIZER.eot_id]
    assert tokens[2, 4] == TOKENIZER.unk_id
    assert (tokens.argmax(dim=-1) == torch.tensor([7, 3, 5])).all()  # <eot> has the largest id
    long = TOKENIZER("a photo of the digit number seven seven seven")
    assert long.shape == (1, 8) and long[0, -1] == TOKENIZER.eot_id
    assert digit_prompts()[7] == "a photo of the digit seven"


def test_clip_triton_matches_torch():
    device = device_for("triton")
    model = CLIP(embed_dim=16, **TOWERS).to(device)
    images = torch.randn(3, 3, 8, 8, device=device)
    tokens = TOKENIZER(["a photo of the digit one", "digit two", "nine"]).to(device)
    def logits_and_loss(m):
        (images_in,) = as_dtype_of(m, images)
        return *m(images_in, tokens), m.contrastive_loss(images_in, tokens)

    assert_as_accurate_as_stock(model, logits_and_loss, floor=FLOOR, grads=False)
    assert triton_calls(model, images, tokens) == {"attention_triton": 2}


def test_clip_text_tower_and_zero_shot():
    model = CLIP(embed_dim=16, **TOWERS, backend="torch")
    tokens = TOKENIZER(["digit one", "digit two"])
    padded = tokens.clone()
    padded[:, 5:] = 3  # different tokens after <eot>: the causal tower pooled at <eot> ignores them
    assert torch.equal(model.encode_text(tokens), model.encode_text(padded))
    # backend assignment reaches both towers
    model.backend = "cuda" if not torch.cuda.is_available() else "torch"
    assert model.visual.backend == model.text.backend == model.backend
    model.backend = "torch"

    logits_per_image, logits_per_text = model(torch.randn(2, 3, 8, 8), tokens)
    assert torch.equal(logits_per_text, logits_per_image.t())
    expected = (F.cross_entropy(logits_per_image, torch.arange(2)) + F.cross_entropy(logits_per_text, torch.arange(2))) / 2
    assert torch.allclose(contrastive_loss(logits_per_image), expected)

    classifier = model.zero_shot_classifier(digit_prompts(), tokenizer=TOKENIZER)
    assert classifier.shape == (10, 16) and torch.allclose(classifier.norm(dim=-1), torch.ones(10))
    ensembled = model.zero_shot_classifier(torch.stack([TOKENIZER(digit_prompts()), TOKENIZER(digit_prompts("digit {}"))], 1))
    assert ensembled.shape == (10, 16)
    logits = model.zero_shot_logits(torch.randn(4, 3, 8, 8), classifier)
    assert logits.shape == (4, 10)


def test_fusion_triton_matches_torch():
    device = device_for("triton")
    model = FusionClassifier(num_classes=10, fusion_depth=1, **TOWERS).to(device)
    images = torch.randn(2, 3, 8, 8, device=device)
    tokens = TOKENIZER("what digit is this").to(device)  # one prompt for every image
    assert_as_accurate_as_stock(model, forward(images, tokens), floor=FLOOR, grads=False)
    assert triton_calls(model, images, tokens) == {"attention_triton": 3}  # ViT, text, cross (Lq=8, Lk=4)
    assert model(images, tokens).shape == (2, 10)


def test_forced_unavailable_backend_reaches_the_kernels(monkeypatch):
    """backend= is passed to the vkernels calls: forcing one that cannot serve raises."""
    monkeypatch.setitem(dispatch._STATUS, "cuda", dispatch.BackendStatus(False, "switched off by this test"))
    x = torch.randn(1, 3, 18, 18)
    for model, inputs in [
        (tiny_cnn("cpu"), (x,)),
        (ResNet(layers=(1,), width=4).eval(), (x,)),
        (tiny_vit("cpu"), (x[..., :8, :8],)),
        (CLIP(embed_dim=16, **TOWERS), (x[..., :8, :8], TOKENIZER("one"))),
    ]:
        model.backend = "cuda"
        with pytest.raises(vkernels.BackendUnavailableError):
            model(*inputs)


# --- torch.compile and autocast over whole models ----------------------------------------------

def _resnet_eval(device):
    model = ResNet(layers=(1, 1), width=4, num_classes=5).to(device)
    randomize_batch_norm(model)
    return model.eval()  # eval: the fused convs with BN folded in


WHOLE_MODELS = {  # name: device -> (model, inputs)
    "seed_cnn": lambda device: (tiny_cnn(device), (torch.randn(2, 3, 18, 18, device=device),)),
    "resnet_eval": lambda device: (_resnet_eval(device), (torch.randn(2, 3, 16, 16, device=device),)),
    "vit": lambda device: (tiny_vit(device), (torch.randn(2, 3, 8, 8, device=device),)),
    "clip": lambda device: (CLIP(embed_dim=16, **TOWERS).to(device),
                            (torch.randn(3, 3, 8, 8, device=device), TOKENIZER(["digit one", "two", "nine"]).to(device))),
    "fusion": lambda device: (FusionClassifier(num_classes=10, fusion_depth=1, **TOWERS).to(device),
                              (torch.randn(2, 3, 8, 8, device=device), TOKENIZER("what digit is this").to(device))),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", WHOLE_MODELS)
def test_model_under_compile_fullgraph(name, backend):
    """No graph break anywhere in the model (fullgraph=True), and as accurate as eager against the
    model in float64 (Inductor rewrites the stock ops around ours: float32 sums in another order)."""
    model, inputs = WHOLE_MODELS[name](device_for(backend))
    eager = outputs_and_grads(model, backend, forward(*inputs))
    exact = outputs_and_grads(copy.deepcopy(model).double(), "torch", forward(*inputs))
    assert_as_accurate(outputs_and_grads(model, backend, forward(*inputs, compiled=True)), eager, exact, FLOOR)


def test_branches_replay_a_run_exactly():
    """support.Branches, which the autocast test rests on: a float64 run replaying a float64 run's
    recorded ReLU and max-pool branches gives its very outputs and gradients (the seed CNN's stock
    F.relu, conv2d_relu and max-pool, the eval ResNet's residual conv2d_relu)."""
    for name in ("seed_cnn", "resnet_eval"):
        model, inputs = WHOLE_MODELS[name](torch.device("cpu"))
        model = model.double()
        branches = Branches()
        with branches.record():
            recorded = outputs_and_grads(model, "torch", forward(*inputs))
        with branches.replay():
            replayed = outputs_and_grads(model, "torch", forward(*inputs))
        assert len(branches.choices) == 6  # three ReLU convs + two pools + the head ReLU; stem, pool, two blocks x two convs
        for key, value in recorded.items():
            assert relative_error(replayed[key], value) < 1e-14, key


# Each model on each kernel backend in fp16 and bf16 (the Triton interpreter has no bf16: its CPU
# autocast is tested in fp16).
AUTOCAST_CASES = [
    pytest.param(name, *param.values, id=f"{name}-{param.id}", marks=param.marks)
    for name in WHOLE_MODELS
    for param in backends_and_dtypes((torch.float16, torch.bfloat16))
]


@pytest.mark.parametrize(("name", "backend", "dtype"), AUTOCAST_CASES)
def test_model_under_autocast(name, backend, dtype):
    """Under autocast the kernels run in the low precision and are as accurate as the stock model
    under the same autocast, output and every gradient, each against the model in float64 taking the
    run's own ReLU and max-pool branches (support.Branches: two low-precision runs can round a
    pre-activation to either side of ReLU's kink, so they are not compared with each other, nor with
    float64's branches). On a GPU also compiled with fullgraph=True."""
    device = device_for(backend)
    model, inputs = WHOLE_MODELS[name](device)

    def run(backend, compiled=False):
        branches = Branches()
        with branches.record(), torch.autocast(device.type, dtype=dtype):
            results = outputs_and_grads(model, backend, forward(*inputs, compiled=compiled))
        with branches.replay():
            exact = outputs_and_grads(copy.deepcopy(model).double(), "torch", forward(*inputs))
        return results, exact

    # autocast rounds each operand and result to the low precision once and sums in float32. Factor 4:
    # the eval ResNet's BN gradients are differences of large terms in 4-element tensors, so the ratio
    # of two runs' rounding errors is wide: the factor it needed, taking each run's own branches, was at
    # most 2.34 over 270 seeds in bf16 and 1.24 over 200 in fp16 (emulated CUDA kernels), 0.6 for the
    # seed CNN; against float64's own branches it was up to 35 for either side (fp16, 8 x 3 x 32 x 32, width 8).
    floor, factor = rounding_floor(dtype, 1), 4
    stock, stock_exact = run("torch")
    with KernelCalls() as calls:
        result, exact = run(backend)
    assert calls.counts, "no vkernels op ran"
    assert_as_accurate(result, stock, exact, floor, factor, stock_exact)
    if GPU:
        compiled, exact = run(backend, compiled=True)
        assert_as_accurate(compiled, stock, exact, floor, factor, stock_exact)
