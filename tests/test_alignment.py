"""CTC alignment of the projector against the LLM's embedding matrix."""

from __future__ import annotations

import torch

from speechlm.alignment import CTCAlignmentHead
from tests.conftest import make_clips


def test_targets_drop_prompt_and_special_tokens():
    head = CTCAlignmentHead(8, ignore_token_ids=[2])
    labels = torch.tensor([[-100, -100, 5, 6, 2], [-100, 7, 2, -100, -100]])
    targets, lengths = head.targets(labels)
    assert targets.tolist() == [5, 6, 7] and lengths.tolist() == [2, 1]


def test_ctc_trains_only_the_projector_and_goes_down(build):
    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.freeze_encoder()
    model.freeze_decoder()
    batch = processor(make_clips((1.0, 0.7)), text=["hello world", "good day"])
    head = CTCAlignmentHead(model.config.text_config.hidden_size, processor.tokenizer.all_special_ids)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = head(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.multi_modal_projector.linear_1.weight.grad is not None and head.blank.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is None for p in model.audio_tower.parameters())


def test_restricted_vocabulary(build):
    """`vocabulary_ids` keeps only those classes: the whole vocabulary gives the full head's loss, a subset that holds
    every label a lower one (fewer competing classes), and a label outside it a ValueError naming the token id."""
    processor, model = build("whisper", "llama", dtype=torch.float32)
    batch = processor(make_clips((1.0, 0.7)), text=["hello world", "good day"])
    hidden, special = model.config.text_config.hidden_size, processor.tokenizer.all_special_ids
    full = CTCAlignmentHead(hidden, special)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    labels = batch["labels"][batch["labels"] >= 0].tolist()
    used = sorted(set(labels) - set(special))
    with torch.no_grad():
        reference = full(model, batch)
        whole = CTCAlignmentHead(hidden, special, vocabulary_ids=range(vocab_size))
        whole.load_state_dict(full.state_dict(), strict=False)  # keeps its own class set
        torch.testing.assert_close(whole(model, batch), reference)
        subset = CTCAlignmentHead(hidden, special, vocabulary_ids=used)
        subset.load_state_dict(full.state_dict(), strict=False)  # keeps its own class set
        assert subset(model, batch) < reference
    try:
        CTCAlignmentHead(hidden, special, vocabulary_ids=used[1:])(model, batch)
    except ValueError as error:
        assert str(used[0]) in str(error) and "vocabulary_ids" in str(error)
    else:
        raise AssertionError("a label outside vocabulary_ids gave no error")


def test_ctc_needs_labels(build):
    processor, model = build("whisper", "llama", dtype=torch.float32)
    head = CTCAlignmentHead(model.config.text_config.hidden_size)
    try:
        head(model, processor(make_clips((1.0,))))
    except ValueError as error:
        assert "labels" in str(error)
    else:
        raise AssertionError("no error without labels")


def test_trainer_ctc_only_phase_then_joint_loss(build, tmp_path):
    """SpeechLMTrainer: CTC-only steps train projector and head; the joint phase adds weight x CTC to the LM loss."""
    from transformers import TrainingArguments

    from speechlm.training import SpeechLMTrainer

    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.freeze_encoder()
    model.freeze_decoder()
    batch = processor(make_clips((1.0, 0.7)), text=["hello world", "good day"])
    head = CTCAlignmentHead(model.config.text_config.hidden_size, processor.tokenizer.all_special_ids)
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=5,
                                  learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                  remove_unused_columns=False, disable_tqdm=True)
    trainer = SpeechLMTrainer(model=model, args=arguments, train_dataset=[0, 1], data_collator=lambda _: batch,
                              ctc_head=head, ctc_only=True)
    blank, projector = head.blank.detach().clone(), model.multi_modal_projector.linear_1.weight.detach().clone()
    model.train()
    trainer.train()
    assert not torch.equal(head.blank, blank)
    assert not torch.equal(model.multi_modal_projector.linear_1.weight, projector)

    model.eval()
    with torch.no_grad():
        lm_loss = model(**batch).loss
        ctc_loss = head(model, batch)
    trainer.ctc_only, trainer.ctc_weight = False, 0.5
    with torch.no_grad():
        joint = trainer.compute_loss(model, batch)
    torch.testing.assert_close(joint, lm_loss + 0.5 * ctc_loss)


def test_greedy_decoding_merges_repeats_drops_blanks_and_maps_classes():
    """Class 0 is the blank; a repeat counts once unless a blank separates it; padding past the length is ignored."""
    head = CTCAlignmentHead(8, vocabulary_ids=[11, 22, 33])
    best = torch.tensor([[0, 1, 1, 0, 1, 3, 3, 2], [2, 2, 0, 0, 3, 1, 1, 1]])  # classes per audio token
    logits = torch.nn.functional.one_hot(best, 4).float()
    assert head.greedy_token_ids(logits, torch.tensor([8, 5])) == [[11, 11, 33, 22], [22, 33]]
    assert CTCAlignmentHead(8).greedy_token_ids(logits, torch.tensor([8, 5])) == [[0, 0, 2, 1], [1, 2]]


def _axis_head() -> tuple[CTCAlignmentHead, torch.Tensor]:
    """A head over a 4-d space whose vocabulary rows are the first three axes and whose blank is the fourth."""
    head = CTCAlignmentHead(4)
    with torch.no_grad():
        head.blank.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    return head, torch.eye(4)[:3]


def test_compression_drops_blanks_and_averages_each_run_of_one_label():
    head, vocabulary = _axis_head()
    e = torch.eye(4)
    clip = torch.stack([2 * e[0], 4 * e[0], e[3], e[1], 3 * e[1], e[3], e[1], 9 * e[0]])  # a a _ b b _ b | pad
    silent = torch.stack([e[3], e[3] + 0.5 * e[2], e[3], e[3], e[3], e[3], e[3], e[3]])  # the head hears nothing
    embeds, lengths = head.compress(torch.stack([clip, silent]), torch.tensor([7, 4]), vocabulary)
    assert lengths.tolist() == [3, 1]
    torch.testing.assert_close(embeds[0], torch.stack([3 * e[0], 2 * e[1], e[1]]))  # a blank splits b from b
    torch.testing.assert_close(embeds[1, 0], e[3] + 0.5 * e[2])  # its least blank token stands for the clip
    assert embeds[1, 1:].abs().sum() == 0


def test_compression_passes_gradients_to_the_kept_tokens():
    head, vocabulary = _axis_head()
    e = torch.eye(4)
    clip = torch.stack([e[0], e[3], 2 * e[1], e[1]]).requires_grad_()
    embeds, _ = head.compress(clip[None], torch.tensor([4]), vocabulary)
    embeds.sum().backward()
    torch.testing.assert_close(clip.grad.sum(-1), torch.tensor([4.0, 0.0, 2.0, 2.0]))  # 1/2 each for the b run


def test_compressing_model_batches_like_one_by_one_and_reloads(build, tmp_path):
    """With `ctc_head.compress`, the LLM reads fewer audio tokens; batched generation still equals one clip at a time,
    and a trainable-only save reloads the head and its settings."""
    from speechlm.modeling import SpeechLMModel

    processor, model = build("whisper", "llama")
    vocabulary = list(range(3, 40))
    model.add_ctc_head(vocabulary, processor.tokenizer.all_special_ids, compress=True)
    clips = make_clips((1.0, 0.4, 0.7))
    batch = processor(clips)
    with torch.no_grad():
        embeds, lengths = model.get_audio_features(batch["input_features"], batch["attention_mask"])
        merged = model.prepare_inputs(**{k: v for k, v in batch.items() if k != "labels"})
    _, counts = model.ctc_head.segments(model.ctc_head.scores(embeds, model.get_input_embeddings().weight), lengths)
    text = batch["decoder_attention_mask"].sum(-1)
    assert merged.attention_mask.sum(-1).tolist() == (counts + 2 + text).tolist()  # start + segments + end + text
    assert (counts < lengths).all()

    loss = model(**processor(clips, text=["turn on", "call mom", "play some jazz"])).loss
    loss.backward()  # training reads the compressed audio too, and the gradient reaches the projector
    assert torch.isfinite(loss) and model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0

    kwargs = dict(max_new_tokens=5, do_sample=False)
    batched = model.generate(**batch, **kwargs)
    for i, clip in enumerate(clips):
        alone = model.generate(**processor([clip]), **kwargs)[0].tolist()
        assert batched[i].tolist()[: len(alone)] == alone

    model.save_pretrained(tmp_path / "model", trainable_only=True)
    reloaded = SpeechLMModel.from_pretrained(tmp_path / "model", dtype=torch.float64)
    assert reloaded.config.ctc_head == {"vocabulary_ids": vocabulary, "compress": True,
                                        "ignore_token_ids": sorted(processor.tokenizer.all_special_ids)}
    torch.testing.assert_close(reloaded.ctc_head.blank, model.ctc_head.blank)
    assert reloaded.generate(**batch, **kwargs).tolist() == batched.tolist()
    model.save_pretrained(tmp_path / "full")  # a full checkpoint carries the head too
    assert SpeechLMModel.from_pretrained(tmp_path / "full").generate(**batch, **kwargs).tolist() == batched.tolist()

    try:
        model.add_ctc_head()
    except ValueError as error:
        assert "already has a CTC head" in str(error)
    else:
        raise AssertionError("a second CTC head was added silently")
    model.freeze_projection()  # the head belongs to the projection side
    assert not any(p.requires_grad for p in model.ctc_head.parameters())


def test_ctc_labels_replace_labels_as_targets(build):
    """An understanding example's labels are its answer; the CTC head must align the audio with the transcript."""
    processor, model = build("whisper", "llama", dtype=torch.float32)
    clips = make_clips((1.0, 0.7))
    transcripts = processor(clips, text=["hello world", "good day"])
    answers = processor(clips, text=["yes", "no"], prompt="Answer:")
    head = CTCAlignmentHead(model.config.text_config.hidden_size, processor.tokenizer.all_special_ids)
    with torch.no_grad():
        reference = head(model, transcripts)
        assert not torch.isclose(head(model, answers), reference)
        with_transcripts = dict(answers, ctc_labels=transcripts["labels"])
        torch.testing.assert_close(head(model, with_transcripts), reference)
