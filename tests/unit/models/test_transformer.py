"""The masked token transformer: its logits, the training masks of its three tasks, and
generation that keeps the given frames (decoding itself: test_maskgit.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from job.config import Stage2Config
from job.models.transformer import (
    CLASS_CONDITIONAL,
    PREDICTION,
    UNCONDITIONAL,
    MaskedVideoTransformer,
    SelfAttention,
    masked_accuracy,
    masked_token_loss,
)

LATENT = (4, 3, 3)  # t, h, w
CODEBOOK = 16
CLASSES = 4


def model(**overrides) -> MaskedVideoTransformer:
    torch.manual_seed(0)
    cfg = dataclasses.replace(Stage2Config(dim=16, depth=1, heads=2, sample_steps=4), **overrides)
    return MaskedVideoTransformer(cfg, CODEBOOK, LATENT, CLASSES)


def codes(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CODEBOOK, (batch, *LATENT), generator=torch.Generator().manual_seed(seed))


def test_logits_for_every_token_position():
    net = model()
    tokens = codes(2).flatten(1)
    logits = net(tokens, torch.tensor([0, CLASSES]))  # a class, and "none"
    assert logits.shape == (2, net.length, CODEBOOK)
    assert torch.isfinite(logits).all()


def test_training_masks_hide_some_tokens_and_keep_the_truth_as_targets():
    net = model()
    batch = net.mask_for_training(codes(64), torch.arange(64) % CLASSES, generator=torch.Generator().manual_seed(1))
    truth = codes(64).flatten(1)
    assert torch.equal(batch.targets, truth)
    assert torch.equal(batch.tokens == net.mask_id, batch.masked)  # hidden exactly where the loss looks
    assert torch.equal(batch.tokens[~batch.masked], truth[~batch.masked])
    assert (batch.masked.sum(1) >= 1).all()
    # Cosine-scheduled ratios: some samples lose most of their tokens, some few.
    shares = batch.masked.float().mean(1)
    assert shares.max() > 0.7 and shares.min() < 0.4


def test_each_task_conditions_as_it_should():
    labels = torch.arange(30) % CLASSES
    for task, weights in ((UNCONDITIONAL, (1.0, 0.0, 0.0)), (CLASS_CONDITIONAL, (0.0, 1.0, 0.0)), (PREDICTION, (0.0, 0.0, 1.0))):
        net = model(unconditional_weight=weights[0], class_weight=weights[1], predict_weight=weights[2])
        batch = net.mask_for_training(codes(30), labels, generator=torch.Generator().manual_seed(2))
        expected_classes = labels if task == CLASS_CONDITIONAL else torch.full_like(labels, CLASSES)
        assert torch.equal(batch.classes, expected_classes)
        given = net.given_positions(net.predict_frames())
        if task == PREDICTION:  # the first latent frames are given: never masked
            assert not batch.masked[:, given].any()
        else:
            assert batch.masked[:, given].any()



def test_a_prediction_sample_is_given_the_codes_that_predict_gives_it():
    """``predict`` encodes the given frames with black after them, and a tokenizer that sees
    neighbouring frames gives their last latent frames other codes than the whole clip does:
    training's prediction task must see those codes, not the whole clip's, or stage 2 learns to
    continue codes it never meets (docs/generation.md, "Given codes as predict gives them")."""
    labels = torch.arange(30) % CLASSES
    truth, given_codes = codes(30), codes(30, seed=9)
    net = model(unconditional_weight=1.0, class_weight=1.0, predict_weight=1.0)
    tasks_seen = net.mask_for_training(truth, labels, generator=torch.Generator().manual_seed(2))
    batch = net.mask_for_training(truth, labels, given_codes, generator=torch.Generator().manual_seed(2))
    given = net.given_positions(net.predict_frames())
    predicting = ~tasks_seen.masked[:, given].any(1)  # rows of the prediction task: their given frames never masked
    assert predicting.any() and (~predicting).any()
    assert torch.equal(batch.tokens[predicting][:, given], given_codes.flatten(1)[predicting][:, given])
    assert torch.equal(batch.tokens[~predicting], tasks_seen.tokens[~predicting])  # other tasks: as before
    assert torch.equal(batch.targets, truth.flatten(1)) and torch.equal(batch.masked, tasks_seen.masked)


def looks_framed(masked: torch.Tensor) -> torch.Tensor:
    """(B,) bool: masked from a latent frame on (no masked token before it, all after it)."""
    per_frame = masked.view(len(masked), LATENT[0], -1).float().mean(-1)
    first = (per_frame > 0).int().argmax(1)
    frames = torch.arange(LATENT[0])[None]
    return ((per_frame == 0) | (frames >= first[:, None])).all(1) & ((per_frame == 1) | (frames <= first[:, None])).all(1)


def test_frame_masking_masks_prediction_samples_as_predict_decodes_them_frame_by_frame():
    """stage2.frame_masking=1: every prediction sample is masked from a latent frame after the
    given ones on, as predict meets it decoding frame by frame: the frames before it whole, some of
    its tokens masked, every token after it masked. The other tasks' masks do not change; at 0.5
    about half the prediction samples are framed."""
    labels = torch.arange(400) % CLASSES
    masks = {  # the two tasks told apart by their classes: none for prediction
        share: model(frame_masking=share, unconditional_weight=0.0).mask_for_training(
            codes(400), labels, generator=torch.Generator().manual_seed(5))
        for share in (0.0, 0.5, 1.0)
    }
    net = model()
    predicting = masks[0.0].classes == CLASSES
    assert predicting.any() and (~predicting).any()
    framed = masks[1.0].masked[predicting]
    assert looks_framed(framed).all()
    first = framed.view(len(framed), LATENT[0], -1).any(-1).int().argmax(1)
    assert set(first.tolist()) == set(range(net.predict_frames(), LATENT[0]))  # every frame after the given ones
    assert torch.equal(masks[1.0].masked[~predicting], masks[0.0].masked[~predicting])
    by_chance = float(looks_framed(masks[0.0].masked[predicting]).float().mean())  # a schedule mask can look framed
    assert by_chance < 0.6
    assert abs(float(looks_framed(masks[0.5].masked[predicting]).float().mean()) - (0.5 + 0.5 * by_chance)) < 0.12


def test_masked_token_loss_is_low_only_for_the_right_answer():
    net = model()
    batch = net.mask_for_training(codes(8), torch.zeros(8, dtype=torch.long), generator=torch.Generator().manual_seed(3))
    right = torch.nn.functional.one_hot(batch.targets[batch.masked], CODEBOOK).float() * 20
    assert float(masked_token_loss(right, batch)) < 1e-3 and float(masked_accuracy(right, batch)) == 1.0
    wrong = torch.nn.functional.one_hot((batch.targets[batch.masked] + 1) % CODEBOOK, CODEBOOK).float() * 20
    assert float(masked_token_loss(wrong, batch)) > 10 and float(masked_accuracy(wrong, batch)) == 0.0


def test_generation_keeps_the_given_frames_and_is_repeatable():
    net = model().eval()
    given = codes(3, seed=4)
    none = torch.full((3,), CLASSES)
    first = net.generate(none, given=given, given_frames=2, generator=torch.Generator().manual_seed(5))
    again = net.generate(none, given=given, given_frames=2, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, *LATENT)
    assert torch.equal(first[:, :2], given[:, :2])
    assert torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) < CODEBOOK


def test_classifier_free_guidance_changes_class_conditional_samples_only():
    plain, guided = model().eval(), model(guidance=3.0).eval()
    with torch.no_grad():
        guided.class_embedding.weight.normal_()  # a class that matters to the logits
        plain.class_embedding.weight.copy_(guided.class_embedding.weight)

    def sample(net, classes):
        return net.generate(classes, generator=torch.Generator().manual_seed(6))

    classes = torch.arange(CLASSES)
    assert not torch.equal(sample(plain, classes), sample(guided, classes))
    none = torch.full((3,), CLASSES)
    assert torch.equal(sample(plain, none), sample(guided, none))  # nothing to guide towards


def test_object_weight_weighs_tokens_other_than_the_background_code():
    net = model()
    batch = net.mask_for_training(codes(8), torch.zeros(8, dtype=torch.long), generator=torch.Generator().manual_seed(7))
    logits = torch.randn(int(batch.masked.sum()), CODEBOOK, generator=torch.Generator().manual_seed(8))
    plain = masked_token_loss(logits, batch)
    assert torch.allclose(masked_token_loss(logits, batch, common_code=0, object_weight=1.0), plain)
    weighted = masked_token_loss(logits, batch, common_code=0, object_weight=5.0)
    per_token = torch.nn.functional.cross_entropy(logits, batch.targets[batch.masked], reduction="none")
    weights = torch.where(batch.targets[batch.masked] == 0, 1.0, 5.0)
    assert torch.allclose(weighted, (per_token * weights).sum() / weights.sum())


def test_conv_position_mixes_each_token_with_its_grid_neighbours_only():
    """stage2.conv_position: a depthwise 3x3x3 convolution over the (t, h, w) token grid at the
    start of each block. With attention and MLP silenced, a change at one cell reaches exactly the
    cells within one step in time, row and column, and none that are merely next in the flat
    sequence (the end of the row before, the start of the next)."""
    net = model(conv_position=True)
    block = net.blocks[0]
    for linear in (block.space.out_proj, block.time.out_proj, block.mlp[2]):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    x = torch.randn(1, net.length, 16)
    nudged = x.clone()
    t, h, w = LATENT
    cell = (1, 1, 0)  # first column: its flat neighbour before it is the previous row's last cell
    nudged[0, (cell[0] * h + cell[1]) * w + cell[2]] += 1.0
    moved = (block(nudged) - block(x)).abs().sum(-1).view(LATENT) > 0
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in LATENT), indexing="ij"), -1)
    near = (grid - torch.tensor(cell)).abs().max(-1).values <= 1
    assert torch.equal(moved, near)


def test_without_conv_position_the_weights_are_those_of_earlier_runs():
    """Runs trained before the option existed have no convolution: their config lacks the key and
    their weights must still load."""
    assert not any("conv" in key for key in model().state_dict())
    assert any("conv" in key for key in model(conv_position=True).state_dict())


def test_patches_join_the_codes_of_a_square_of_one_latent_frame_and_nothing_else():
    """stage2.patch: the blocks see one position per patch x patch codes of a latent frame. With
    the blocks silenced, a change of one code changes the logits of exactly the codes of its
    patch: the same latent frame, the same 2 x 2 square."""
    latent = (2, 4, 4)
    torch.manual_seed(0)
    net = MaskedVideoTransformer(Stage2Config(dim=16, depth=1, heads=2, patch=2), CODEBOOK, latent, CLASSES).eval()
    block = net.blocks[0]
    for linear in (block.space.out_proj, block.time.out_proj, block.mlp[2]):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    tokens = torch.zeros(1, 32, dtype=torch.long)
    changed = tokens.clone()
    t, row, col = 1, 2, 3
    changed[0, (t * 4 + row) * 4 + col] = 5
    none = torch.tensor([CLASSES])
    moved = (net(changed, none) - net(tokens, none)).abs().sum(-1).view(latent) > 0
    expected = torch.zeros(latent, dtype=torch.bool)
    expected[1, 2:4, 2:4] = True
    assert torch.equal(moved, expected)
    assert net.position.shape[1] == 2 * 2 * 2  # positions per patch, not per code


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "sdpa"])
def test_self_attention_is_pytorchs_multihead_attention(explicit):
    """SelfAttention computes what nn.MultiheadAttention does, by either path (the explicit one
    the CPU takes, PyTorch's fused kernel elsewhere), and keeps its parameter names and initial
    weights: the checkpoints of runs trained with nn.MultiheadAttention load unchanged, and a seed
    gives the initial transformer it gave before."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    torch.manual_seed(0)
    ours = SelfAttention(16, 4)
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[key], theirs[key]) for key in theirs)
    ours.explicit = explicit
    x = torch.randn(6, 9, 16, requires_grad=True)
    expected = reference(x, x, x, need_weights=False)[0]
    got = ours(x)
    assert torch.allclose(got, expected, atol=1e-6)
    grad = torch.randn_like(got)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.allclose(got_grad, expected_grad, atol=1e-6)


def test_logits_at_the_masked_positions_are_those_of_the_full_forward():
    """Training asks for logits only where the loss is computed: the same numbers as the full
    forward's there, in the order of ``masked`` read row by row."""
    net = model().eval()
    batch = net.mask_for_training(codes(4), torch.arange(4), generator=torch.Generator().manual_seed(9))
    full = net(batch.tokens, batch.classes)
    picked = net(batch.tokens, batch.classes, at=batch.masked)
    assert picked.shape == (int(batch.masked.sum()), CODEBOOK)
    assert torch.allclose(picked, full[batch.masked], atol=1e-6)
