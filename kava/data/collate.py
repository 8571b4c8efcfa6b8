"""Example -> token segments -> TeacherBatch / StudentBatch (ids, masks, positions, labels).

Sequences (METHOD.md):
    teacher:  Q <bot> C <eot> P A <eos>       right-padded
    student:  [Q <bot>] [z_1 .. z_M] [<eot> P A <eos>]
              left-padded prefix, M latent slots, right-padded suffix,
              so the latent slots line up in one column block for the whole batch.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Iterable

import torch

from kava.data import Example

if TYPE_CHECKING:
    from kava.config import KavaConfig

IGNORE = -100


@dataclass
class Segments:
    """Token ids of one example, split by role."""

    question: list[int]  # Q <bot>  (BOS first when the tokenizer has one)
    cot: list[int]  # C
    prompt: list[int]  # <eot> P
    answer: list[int]  # A <eos>

    @property
    def teacher_len(self) -> int:
        return len(self.question) + len(self.cot) + len(self.prompt) + len(self.answer)


class SegmentEncoder:
    """Encodes Examples into Segments (question, CoT, answer prompt, answer token ids) with one fixed
    convention for BOS, numbers and spaces. Wraps the HF tokenizer; ``model.encoder`` is one."""

    def __init__(self, tokenizer, special_ids: dict[str, int], answer_prompt: str = "The answer is:"):
        self.tok = tokenizer
        self.bot, self.eot, self.latent = special_ids["<bot>"], special_ids["<eot>"], special_ids["<latent>"]
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        # Start the question the way the tokenizer itself would (BOS for Llama-3, nothing for SmolLM2/Qwen).
        plain = self._enc("1")
        with_special = tokenizer("1")["input_ids"]
        self.bos = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self.prompt_ids = self._enc(answer_prompt)

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def question_ids(self, question: str) -> list[int]:
        return self.bos + self._enc(question) + [self.bot]

    def segments(self, ex: Example) -> Segments:
        # The answer follows "P" with a leading space, like numbers inside the CoT follow "=" or a space.
        return Segments(
            question=self.question_ids(ex.question),
            cot=self._enc(" ".join(ex.steps)) if ex.steps else [],
            prompt=[self.eot] + self.prompt_ids,
            answer=self._enc(" " + ex.answer.strip()) + [self.eos],
        )


class SegmentStore:
    """The Segments of many examples with their token ids packed in one int32 array (4 bytes a token, no Python
    object per token: about 0.2 GB for 385k examples of ~110 tokens, an estimate). ``store[i]`` is the i-th
    example's Segments, equal to ``encoder.segments(example)``. Training collates its micro-batches from here
    (:func:`batches_from_segments`), so an example is tokenised once, when the data are prepared, not at every step."""

    def __init__(self, segments: Iterable[Segments] = ()):
        self._ids = array("i")
        self._ends = array("q", [0])  # per example: the ends of its question, CoT, prompt and answer in _ids
        for s in segments:
            self.append(s)

    def append(self, s: Segments) -> int:
        """Add one example's Segments; returns its index."""
        for part in (s.question, s.cot, s.prompt, s.answer):
            self._ids.extend(part)
            self._ends.append(len(self._ids))
        return len(self) - 1

    def __len__(self) -> int:
        return (len(self._ends) - 1) // 4

    def __getitem__(self, i: int) -> Segments:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of a SegmentStore of {n}")
        e = self._ends[4 * (i % n): 4 * (i % n) + 5]
        return Segments(*(self._ids[e[k]:e[k + 1]].tolist() for k in range(4)))


class SegmentCache:
    """Tokenises each distinct example once. ``segments(ex)`` is ``encoder.segments(ex)``, remembered (packed) by
    the example's content, so it can stand in for the encoder wherever only ``segments`` is called (data
    preparation: the ``data.max_tokens`` length filter, the crop-budget check). :meth:`store` then hands the
    training examples' Segments to the loop without tokenising them again."""

    def __init__(self, encoder: "SegmentEncoder"):
        self.encoder = encoder
        self._rows: dict[tuple, int] = {}
        self._packed = SegmentStore()

    def segments(self, ex: Example) -> Segments:
        key = (ex.question, tuple(ex.steps), ex.answer)
        row = self._rows.get(key)
        if row is not None:
            return self._packed[row]
        segs = self.encoder.segments(ex)
        self._rows[key] = self._packed.append(segs)
        return segs

    def store(self, examples: Iterable[Example]) -> SegmentStore:
        """The Segments of ``examples``, in order (any not seen yet are tokenised now); the cache is then emptied."""
        out = SegmentStore(self.segments(ex) for ex in examples)
        self._rows, self._packed = {}, SegmentStore()
        return out


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``labels.flatten()`` [B*N] of the labels a CE predicts: not IGNORE, column >= 1 (the
    hidden state at index - 1 predicts each). Row-major, the order of a boolean mask over ``labels[:, 1:]``.

    Built on the host by the collator, so the loss on the device gathers a known number of positions and never
    reads a data-dependent shape back (a boolean mask there costs a host sync per CE term).
    """
    keep = labels != IGNORE
    keep[:, :1] = False
    return keep.flatten().nonzero().squeeze(1)


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids implied by padding: count of real tokens before each slot (pads get a clamped value)."""
    pos = mask.long().cumsum(-1) - 1
    if isinstance(offset, torch.Tensor):
        offset = offset[:, None]
    return (pos + offset).clamp_min(0)


class _LabelledBatch:
    """What both batches share: ``label_index`` derived from their label tensor (named by ``_labels``) when not
    given, its count, and the move to a device (tensors only)."""

    _labels = "labels"

    def __post_init__(self):
        if self.label_index is None:
            self.label_index = label_positions(getattr(self, self._labels))

    @property
    def num_labels(self) -> int:
        """Tokens the CE averages over (a shape: no device read)."""
        return self.label_index.numel()

    def to(self, device, non_blocking: bool = False):
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                             for k, v in kw.items()})


@dataclass
class TeacherBatch(_LabelledBatch):
    """Q <bot> C <eot> P A <eos>, right-padded. B examples, N tokens.

    input_ids, attention_mask, position_ids, labels: [B, N] (labels: C, <eot>, P, A, <eos>; else -100)
    cot_index, cot_valid: [B, Nc]   positions of the CoT tokens
    query_index, query_valid: [B, Na]   answer-query positions for importance
    prompt_last: [B]   position of the last token of P (CODI target)
    label_index: [K]   flat positions of the K CE labels (:func:`label_positions`); derived from ``labels``
                       when not given (hand-built batches)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cot_index: torch.Tensor
    cot_valid: torch.Tensor
    query_index: torch.Tensor
    query_valid: torch.Tensor
    prompt_last: torch.Tensor
    label_index: torch.Tensor | None = None


@dataclass
class StudentBatch(_LabelledBatch):
    """Student inputs. prefix: Q <bot> left-padded [B, Nq]; suffix: <eot> P A <eos> right-padded [B, Ns].

    suffix_labels [B, Ns]: the student CE targets (A, <eos>; P too if configured), -100 elsewhere.
    prompt_last: index in the suffix of the last P token (same for every row).
    label_index [K]: flat positions of the K CE labels in ``suffix_labels`` (:func:`label_positions`; derived
    when not given).
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_labels: torch.Tensor
    prompt_last: int
    label_index: torch.Tensor | None = None

    _labels = "suffix_labels"


def collate_teacher(segs: list[Segments], pad_id: int, importance_queries: str = "prompt_and_answer") -> TeacherBatch:
    rows, labels, cot_pos, query_pos, prompt_last = [], [], [], [], []
    for s in segs:
        ids = s.question + s.cot + s.prompt + s.answer
        rows.append(ids)
        q, c, p = len(s.question), len(s.cot), len(s.prompt)
        # label[i] is the token at i; the model predicts it from i-1 (shifted in the loss).
        labels.append([IGNORE] * q + ids[q:])
        cot_pos.append(list(range(q, q + c)))
        # P excludes <eot> (first prompt token); A excludes <eos>.
        p_start = q + c + 1
        a_end = q + c + p + len(s.answer) - 1
        start = p_start if importance_queries == "prompt_and_answer" else q + c + p
        query_pos.append(list(range(start, a_end)))
        prompt_last.append(q + c + p - 1)
    input_ids = pad_rows(rows, pad_id)
    attention_mask = pad_rows([[1] * len(r) for r in rows], 0).bool()
    return TeacherBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        labels=pad_rows(labels, IGNORE),
        cot_index=pad_rows(cot_pos, 0),
        cot_valid=pad_rows([[1] * len(c) for c in cot_pos], 0).bool(),
        query_index=pad_rows(query_pos, 0),
        query_valid=pad_rows([[1] * len(q) for q in query_pos], 0).bool(),
        prompt_last=torch.tensor(prompt_last, dtype=torch.long),
    )


def collate_student(segs: list[Segments], pad_id: int, ce_on_prompt: bool = False) -> StudentBatch:
    prefixes = [s.question for s in segs]
    suffixes = [s.prompt + s.answer for s in segs]
    labels = []
    for s in segs:
        # Student CE: A and <eos> (P optional); never <eot>, which is given.
        prompt_labels = [IGNORE] + s.prompt[1:] if ce_on_prompt else [IGNORE] * len(s.prompt)
        labels.append(prompt_labels + s.answer)
    prompt_lens = {len(s.prompt) for s in segs}
    if len(prompt_lens) != 1:
        raise ValueError("the answer prompt must tokenize to the same length in every example")
    return StudentBatch(
        prefix_ids=pad_rows(prefixes, pad_id, left=True),
        prefix_mask=pad_rows([[1] * len(p) for p in prefixes], 0, left=True).bool(),
        suffix_ids=pad_rows(suffixes, pad_id),
        suffix_mask=pad_rows([[1] * len(x) for x in suffixes], 0).bool(),
        suffix_labels=pad_rows(labels, IGNORE),
        prompt_last=prompt_lens.pop() - 1,
    )


def collate_segments(segs: list[Segments], pad_id: int, cfg: "KavaConfig", teacher: bool = True,
                     student: bool = True) -> tuple[TeacherBatch | None, StudentBatch | None]:
    """Teacher and/or student batch of ``segs`` under ``cfg``: the one place that reads the config keys of
    collation (``eviction.importance_queries``, ``loss.student_ce_on_prompt``)."""
    tb = collate_teacher(segs, pad_id, cfg.eviction.importance_queries) if teacher else None
    sb = collate_student(segs, pad_id, cfg.loss.student_ce_on_prompt) if student else None
    return tb, sb


def batches_from_segments(segs: list[Segments], pad_id: int, cfg: "KavaConfig", teacher_only: bool = False
                          ) -> tuple[TeacherBatch | None, StudentBatch | None]:
    """(TeacherBatch | None, StudentBatch | None) of already tokenised examples: only what ``cfg.method`` trains on
    (no teacher for nocot, no student for cot or ``teacher_only``), collated with :func:`collate_segments`.
    The training loop collates from its :class:`SegmentStore` through here; :func:`make_batches` too."""
    need_teacher = cfg.method != "nocot" or teacher_only
    need_student = cfg.method != "cot" and not teacher_only
    return collate_segments(segs, pad_id, cfg, teacher=need_teacher, student=need_student)


def make_batches(examples: list[Example], encoder: SegmentEncoder, cfg: "KavaConfig",
                 teacher_only: bool = False) -> tuple[TeacherBatch | None, StudentBatch | None]:
    """:func:`batches_from_segments` of ``examples``, tokenised now. Validation, ``KavaModel.training_loss(examples)``
    and ``kava analyze`` go through here; training collates from Segments tokenised once (:class:`SegmentStore`),
    which gives the same batches."""
    return batches_from_segments([encoder.segments(ex) for ex in examples], encoder.pad, cfg, teacher_only)
