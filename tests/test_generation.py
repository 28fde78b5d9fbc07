"""Stage-1 captioning (cached, through transformers' `generate`) equals transformers' `generate` run over a reference
decoder that re-reads the image and re-runs the whole `[queries; text]` pass with the multimodal-causal mask at every
step, without any cache (the way LAVIS decodes). Both sides run in float64, so that cached and uncached numbers
agree to far below the float32 the search works in."""

import dataclasses

import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from qformer.caption import GenerationConfig, generate, pad_after_end
from tests.helpers import tiny_qformer

PAD, BOS, NEVER = 0, 5, 4  # NEVER: an end token the model is biased never to emit
VOCAB, BATCH, IMAGE_TOKENS, LIMIT = 40, 4, 5, 10


class NoCacheReference(PreTrainedModel, GenerationMixin):
    """Every step: the image features and all tokens so far through `QFormer.forward(causal=True)`; last position's
    logits. transformers repeats `image_embeds` for beams and samples; there is no cache to reorder."""

    main_input_name = "input_ids"

    def __init__(self, qformer):
        super().__init__(PretrainedConfig(vocab_size=qformer.cfg.vocab_size, pad_token_id=PAD))
        self.qformer = qformer

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

    def prepare_inputs_for_generation(self, input_ids, image_embeds=None, **kwargs):
        return {"input_ids": input_ids, "image_embeds": image_embeds}

    def forward(self, input_ids, image_embeds, return_dict=True):
        hidden = self.qformer(input_ids, image_embeds=image_embeds, causal=True).hidden  # [R, Q + T, D]
        return CausalLMOutput(logits=self.qformer.lm_logits(hidden[:, -1:]))


def _model(ends: bool):
    """A random tiny Q-Former in float64, a batch of images and the end token: one the model emits after a few
    tokens, at different steps for different images (`ends`), or one it never emits (captions hit the limit)."""
    model = tiny_qformer(vocab_size=VOCAB).double()
    image = torch.randn(BATCH, IMAGE_TOKENS, model.cfg.encoder_width, dtype=torch.float64)
    if not ends:
        with torch.no_grad():
            model.lm_head.bias[NEVER] -= 30.0
        return model, image, NEVER
    # Decode without ending (min_new_tokens = max_new_tokens bars the end token), then take as the end token the
    # one whose first appearances are spread over the most steps.
    cfg = GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=LIMIT, num_beams=1)
    ids = generate(
        model,
        model(image_embeds=image, use_cache=True).cache,
        bos_token_id=BOS,
        eos_token_id=NEVER,
        pad_token_id=PAD,
        cfg=cfg,
    )

    def first_steps(token):
        return {row.index(token) for row in ids.tolist() if token in row[1:]}

    eos = max((t for t in range(VOCAB) if t not in (PAD, BOS)), key=lambda t: len(first_steps(t)))
    return model, image, eos


def _ours(model, image, eos, cfg):
    cache = model(image_embeds=image, use_cache=True).cache
    return generate(model, cache, bos_token_id=BOS, eos_token_id=eos, pad_token_id=PAD, cfg=cfg)


def _reference(model, image, eos, cfg):
    start = torch.full((image.shape[0], 1), BOS)
    ids = NoCacheReference(model).generate(
        start, image_embeds=image, use_cache=False, **cfg.generate_kwargs(eos_token_id=eos, pad_token_id=PAD)
    )
    return pad_after_end(ids[:, 1:], eos, PAD)


def _lengths(ids, eos):
    """Generated tokens per row, the end token included."""
    return [row.tolist().index(eos) + 1 if eos in row.tolist() else len(row) for row in ids]


SEARCHES = {
    "greedy": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=1),
    "beams2": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=2, length_penalty=1.0),
    "beams2_lp-1": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=2, length_penalty=-1.0),
    "beams5": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=5, length_penalty=1.0),
    "beams5_lp-1": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=5, length_penalty=-1.0),
    "beams5_early": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=5, early_stopping=True),
    "beams5_repetition": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=5, repetition_penalty=1.5),
    "beams5_3best": GenerationConfig(max_new_tokens=LIMIT, min_new_tokens=1, num_beams=5, num_return_sequences=3),
}


@pytest.mark.parametrize("ends", [True, False], ids=["ends", "runs_to_limit"])
@pytest.mark.parametrize("name", list(SEARCHES))
def test_cached_search_equals_uncached_reference(name, ends):
    cfg = SEARCHES[name]
    model, image, eos = _model(ends)
    ours, reference = _ours(model, image, eos, cfg), _reference(model, image, eos, cfg)
    assert ours.shape[0] == BATCH * cfg.num_return_sequences
    assert torch.equal(ours, reference), (ours, reference)
    if not ends:
        assert not (ours == eos).any() and ours.shape[1] == LIMIT


def test_the_ending_model_ends_captions_at_several_lengths():
    """What the "ends" cases above cover: captions ending at several steps, and beam captions that end next to ones
    that hit the limit."""
    model, image, eos = _model(ends=True)
    lengths = {name: _lengths(_ours(model, image, eos, cfg), eos) for name, cfg in SEARCHES.items()}
    assert len({n for n in lengths["greedy"] if n < LIMIT}) >= 2, lengths
    beam = [n for name, ns in lengths.items() if name != "greedy" for n in ns]
    assert min(beam) < LIMIT and max(beam) == LIMIT, lengths


@pytest.mark.parametrize("name", ["greedy", "beams5_lp-1"])
def test_min_new_tokens_forces_longer_captions(name):
    model, image, eos = _model(ends=True)
    free = _lengths(_ours(model, image, eos, SEARCHES[name]), eos)
    forced_cfg = dataclasses.replace(SEARCHES[name], min_new_tokens=min(free) + 2)
    forced = _ours(model, image, eos, forced_cfg)
    assert torch.equal(forced, _reference(model, image, eos, forced_cfg))
    # The end token comes at new token min_new_tokens + 1 at the earliest.
    assert min(_lengths(forced, eos)) > forced_cfg.min_new_tokens > min(free)


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(max_new_tokens=8, min_new_tokens=1, num_beams=1, do_sample=True, top_p=0.9, top_k=0),
        GenerationConfig(
            max_new_tokens=8,
            min_new_tokens=2,
            num_beams=1,
            do_sample=True,
            top_k=5,
            temperature=0.7,
            num_return_sequences=3,
        ),
        GenerationConfig(max_new_tokens=8, min_new_tokens=1, num_beams=3, do_sample=True, top_p=0.9),
    ],
    ids=["nucleus", "top_k_3_samples", "beam_sample"],
)
def test_sampling_with_a_fixed_seed_equals_reference(cfg):
    model, image, eos = _model(ends=True)
    torch.manual_seed(7)
    ours = _ours(model, image, eos, cfg)
    torch.manual_seed(7)
    reference = _reference(model, image, eos, cfg)
    assert ours.shape[0] == BATCH * cfg.num_return_sequences
    assert torch.equal(ours, reference), (ours, reference)
    torch.manual_seed(8)
    assert not torch.equal(_ours(model, image, eos, cfg), ours)  # it does sample: another seed, other captions


@pytest.mark.parametrize("name", ["greedy", "beams2", "beams5_early"])
def test_a_batch_equals_its_items_one_at_a_time(name):
    model, image, eos = _model(ends=True)
    cfg = SEARCHES[name]
    batched = _ours(model, image, eos, cfg)
    assert len(set(_lengths(batched, eos))) >= 2  # items that finish early wait for the others
    for b in range(BATCH):
        alone = _ours(model, image[b : b + 1], eos, cfg)[0]
        width = alone.shape[0]
        assert torch.equal(batched[b, :width], alone), (b, batched[b], alone)
        assert (batched[b, width:] == PAD).all()
