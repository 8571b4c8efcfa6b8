"""KavaModel: one backbone, two modes (teacher, student), the KaVa training loss, generation, save/load.

Public API (also exported by ``import kava``)::

    model = KavaModel.from_pretrained("ckpt" | "hub/id" | "local/hf_dir")   # or from_config(cfg), from_backbone(lm, tok, cfg)
    loss, metrics = model.training_loss(examples)      # == model(examples); list[Example] or collated batches
    trace = model.latent_reasoning(["question", ...])  # LatentTrace: .latents [B, M, D], .latent_kv {t: (K, V)}
    outs = model.generate(["question", ...], mode="latent" | "cot" | "direct")   # list[Generation]
    model.save_pretrained("ckpt")
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kava.attention import ImportanceCapture
from kava.attention import PREFIX as CAPTURE_PREFIX
from kava.attention import capturing_attention_name
from kava.backbone import DTYPES, LatentProjection, add_special_tokens, apply_lora, load_backbone
from kava.config import OFFLINE_SMOLLM2, ConfigError, KavaConfig, config_value
from kava.data import Example
from kava.data.collate import (
    SegmentEncoder,
    StudentBatch,
    TeacherBatch,
    label_positions,
    pad_rows,
    positions_from_mask,
)
from kava.data.collate import make_batches as collate_examples
from kava.eviction import CompressedKV, compress_kv, needs_importance
from kava.latent import LatentTrace, QuestionState, compile_fixed_pass, fixed_shape_pass, run_latents
from kava.rope import rotary_inv_freq, rotate_keys, slot_shifts
from kava.losses import LossShares, supervised_iterations, total_loss
from kava.token_rows import use_row_forward

log = logging.getLogger(__name__)

# Config keys that define the weights stored in a checkpoint: a config given to load / from_pretrained must agree.
WEIGHT_KEYS = ("model.name_or_path", "lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
               "latent.use_projection")


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu"):
    """Draw from torch's CPU RNG (and ``device``'s, when it is a GPU) seeded with ``seed``; restore both after.

    The global RNG state the caller had is left exactly as it was (``torch.random.fork_rng``).
    """
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        yield


@dataclass
class TeacherOutput:
    """ce: scalar; cot_keys/cot_values [B, L, H_kv, Nc, d] (detached); cot_valid [B, Nc];
    hidden [B, L, D] at the last P token (detached); importance [B, L, H_kv, Nc] or None;
    question: the ``Q <bot>`` KV and <bot> state, not detached, in the student layout (when asked for)."""

    ce: torch.Tensor
    cot_keys: torch.Tensor
    cot_values: torch.Tensor
    cot_valid: torch.Tensor
    hidden: torch.Tensor
    importance: torch.Tensor | None
    question: QuestionState | None = None


@dataclass
class StudentOutput:
    """ce: scalar; hidden [B, L, D] at the last P token; trace: the latent reasoning (KV per iteration)."""

    ce: torch.Tensor
    hidden: torch.Tensor
    trace: LatentTrace | None


def masked_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
              label_index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over labelled tokens; logits only at the positions that predict a label.

    hidden [B, N, D]; labels [B, N] (label i is predicted from position i-1). label_index [K]: the flat
    positions of the labels (``collate.label_positions``, which the batches carry); a gather of K known rows
    needs no host sync, where a boolean mask on the device reads its count back. None: derived here (a sync).
    """
    if label_index is None:
        label_index = label_positions(labels)
    logits = lm_head(hidden.flatten(0, 1).index_select(0, label_index - 1))
    return F.cross_entropy(logits.float(), labels.flatten().index_select(0, label_index))


def supervised_kv(latent_kv: dict, kv_supervision: str) -> dict:
    """The iterations of ``latent_kv`` whose KV loss ``losses.total_loss`` trains on
    (``losses.supervised_iterations``); the others' KV losses are metrics only. total_loss, given this subset,
    picks the same iterations, so the loss is unchanged (tests/test_model.py)."""
    return {t: latent_kv[t] for t in supervised_iterations(latent_kv, kv_supervision)}


def question_from_teacher(cache, last_hidden: torch.Tensor, prefix_mask: torch.Tensor) -> QuestionState:
    """The teacher's ``Q <bot>`` KV and <bot> hidden state, moved to the student's left-padded layout.

    The teacher row starts with the same ``Q <bot>`` tokens at the same position ids (0..n-1), and
    causal attention keeps later tokens out, so these equal the student's own prefix pass. Gathers
    keep the autograd graph: the student's losses train the question pass through the teacher's.
    Pad slots copy position 0; the prefix mask hides them.
    """
    B, Nq = prefix_mask.shape
    n = prefix_mask.long().sum(-1)                                                  # [B]
    src = (torch.arange(Nq, device=n.device)[None] - (Nq - n)[:, None]).clamp_min(0)  # [B, Nq]

    def move(x: torch.Tensor) -> torch.Tensor:                                       # [B, H, N, d]
        return torch.gather(x, 2, src[:, None, :, None].expand(B, x.shape[1], Nq, x.shape[-1]))

    kv = [(move(layer.keys), move(layer.values)) for layer in cache.layers]
    last = last_hidden[torch.arange(B, device=n.device), n - 1]
    return QuestionState(kv=kv, last_hidden=last)


class KavaModel(nn.Module):
    """Backbone (+LoRA) and projection head; ``teacher`` and ``student`` share every weight."""

    def __init__(self, cfg: KavaConfig, lm: nn.Module, tokenizer, special_ids: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.lm = lm  # PeftModel or plain PreTrainedModel
        use_row_forward(lm)  # the new-token rows without peft's V x D copy per call (kava/token_rows.py)
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.encoder = SegmentEncoder(tokenizer, special_ids, cfg.data.answer_prompt)
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.decoder_stack = base.model
        self.lm_head = base.lm_head
        self.config = base.config
        self.projection = LatentProjection(self.config.hidden_size, cfg.latent.use_projection)
        if cfg.latent.projection_scale == "embedding":
            self.projection.match_embedding_scale(base.get_input_embeddings().weight)

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_backbone(cls, model: nn.Module, tokenizer, config: KavaConfig | None = None) -> "KavaModel":
        """Wrap an already loaded HF causal LM (e.g. ``AutoModelForCausalLM.from_pretrained(...)``) and its tokenizer.

        Modifies both in place, where they are: adds ``<bot>``, ``<eot>``, ``<latent>`` (and a pad token if
        there is none) to ``tokenizer`` and resizes the embeddings if needed (the new tokens' rows, added or spare, start at the mean embedding of the known tokens);
        routes attention through the importance-capturing wrapper of the kernel the backbone already uses
        (an ``eager`` backbone gets ``config.model.attn_implementation``, ``sdpa`` by default); applies LoRA per
        ``config.lora`` (``lora.enabled=false``: every weight becomes trainable); adds the projection head
        (fp32, on the backbone's device). Nothing is reloaded and nothing is moved to another device or dtype.

        RNG: the random initial values (LoRA A matrices, the projection head, the resized embedding rows before
        they are overwritten) are drawn from torch's RNG seeded with ``config.train.seed`` inside
        ``torch.random.fork_rng``. They depend on ``train.seed`` (and the backbone's device type) only, and
        the caller's global RNG state is left unchanged (the global RNG is never reseeded).

        config: default ``KavaConfig()`` with ``model.name_or_path`` set to the backbone's ``name_or_path``.
        The model's config (``model.cfg``) is it resolved (what ``method`` implies, as in training), with the
        backbone's actual ``model.dtype`` and ``model.attn_implementation``.
        With LoRA, :meth:`save_pretrained` stores the adapter and not the base weights, and loading reloads
        the base from ``model.name_or_path``: a warning is logged when that does not name this backbone.
        """
        if hasattr(model, "peft_config"):
            raise ValueError("from_backbone: expected a plain transformers causal LM, got a peft model "
                             "(KaVa applies LoRA itself, per config.lora)")
        cfg = _config_for_backbone(model, config)
        device = model.get_input_embeddings().weight.device
        with seeded_rng(cfg.train.seed, device):
            special = add_special_tokens(model, tokenizer)
            attn = capturing_attention_name(cfg.model.attn_implementation)
            if model.config._attn_implementation != attn:
                model.set_attn_implementation(attn)
            lm = apply_lora(model, cfg.lora, list(special.values()))
            kava = cls(cfg, lm, tokenizer, special)
        kava.projection.to(device)
        return kava

    @classmethod
    def from_config(cls, cfg: KavaConfig) -> "KavaModel":
        """Load ``cfg.model`` (backbone and tokenizer, on CPU, in ``model.dtype``), then :meth:`from_backbone`."""
        base, tokenizer = load_backbone(cfg.model)
        return cls.from_backbone(base, tokenizer, cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, config: KavaConfig | None = None, *,
                        is_trainable: bool = False) -> "KavaModel":
        """A trained KaVa model, or a new one around a pretrained backbone.

        - A KaVa checkpoint directory (``kava_meta.json``, ``config.yaml``: written by :meth:`save_pretrained`,
          by training or by ``kava export``) or a training run directory (its latest complete checkpoint):
          :meth:`load`, which verifies the files. ``config``, if given, replaces the saved config (another
          ``method``, ``latent.num_iterations``, ``eval.*``, ``model.dtype``...) and must agree with it on
          :data:`WEIGHT_KEYS`. ``is_trainable``: LoRA adapters trainable, to train on (default: frozen).
        - Anything else is a hub id or a local HF model directory: :meth:`from_config` with ``config``
          (default ``KavaConfig()``) and ``model.name_or_path = name_or_path``; a new, untrained KaVa model.

        Returned in eval mode, as transformers' ``from_pretrained`` does (``.train()`` before training).
        """
        from kava.checkpoint import CHECKPOINTS, CheckpointError, latest_checkpoint

        name = str(name_or_path)
        p = Path(name).expanduser()
        if p.is_dir() and (p / CHECKPOINTS).is_dir() and not (p / "kava_meta.json").exists():
            latest = latest_checkpoint(p)
            if latest is None:
                raise CheckpointError(f"{p}: training run without a complete checkpoint under {p / CHECKPOINTS}")
            p = latest
        if p.is_dir() and ((p / "kava_meta.json").exists() or (p / "config.yaml").exists()):
            return cls.load(p, is_trainable=is_trainable, config=config).eval()
        cfg = config if config is not None else KavaConfig()
        return cls.from_config(replace(cfg, model=replace(cfg.model, name_or_path=name))).eval()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def final_norm(self) -> nn.Module:
        """The backbone's final norm (applied to its last hidden states before the LM head)."""
        norm = getattr(self.decoder_stack, "norm", None)
        if norm is None:
            raise AttributeError(f"{type(self.decoder_stack).__name__} has no final `norm`")
        return norm

    def vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``lm_head(final_norm(h))``: vocabulary logits of vectors in the residual stream that did not go
        through the final norm, such as latents (the backbone's own outputs already did)."""
        w = self.lm_head.weight
        return self.lm_head(self.final_norm(h.to(device=w.device, dtype=w.dtype)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder_stack.embed_tokens(ids)

    def _decode(self, embeds, mask, positions, cache, **kw):
        out = self.decoder_stack(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **kw
        )
        return out

    def _prefix_pass(self, prefix_ids, prefix_mask):
        """``Q <bot>`` alone (no latents): -> (model output, next position [B])."""
        out = self._decode(self.embed(prefix_ids), prefix_mask, positions_from_mask(prefix_mask), None)
        return out, prefix_mask.long().sum(-1)

    def _decoder_fn(self):
        def call(embeds, mask, positions, cache):
            out = self._decode(embeds, mask, positions, cache)
            return out.last_hidden_state, out.cache

        return call

    def _fixed_pass(self):
        """The M-slot latent pass (:func:`kava.latent.fixed_shape_pass`): eager, or with ``latent.compile``
        compiled once per model and kept (``torch.compile`` caches its graphs on it)."""
        if not self.cfg.latent.compile:
            return fixed_shape_pass(self._decoder_fn())
        compiled = self.__dict__.get("_compiled_pass")
        if compiled is None:
            compiled = compile_fixed_pass(self._decoder_fn())
            self.__dict__["_compiled_pass"] = compiled
        return compiled

    # ---- teacher -----------------------------------------------------------
    def teacher(self, batch: TeacherBatch, capture_importance: bool = True,
                question_mask: torch.Tensor | None = None) -> TeacherOutput:
        """One forward with gradients: CE, detached CoT KV, detached CODI targets, importance.

        question_mask: the student batch's left-padded prefix mask [B, Nq]; when given, the output
        also carries the ``Q <bot>`` state moved into that layout, for the student to reuse.
        """
        capture = None
        if capture_importance:
            capture = ImportanceCapture(
                query_index=batch.query_index,
                query_valid=batch.query_valid,
                cot_index=batch.cot_index,
                cot_valid=batch.cot_valid,
                key_valid=batch.attention_mask,
                softmax_over=self.cfg.eviction.importance_softmax,
            )
        kw = {"kava_capture": capture} if capture is not None else {}
        out = self.decoder_stack(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            output_hidden_states=True,
            **kw,
        )
        ce = masked_ce(out.last_hidden_state, batch.labels, self.lm_head, batch.label_index)
        B = batch.input_ids.shape[0]
        rows = torch.arange(B, device=batch.input_ids.device)
        with torch.no_grad():
            idx = batch.cot_index
            keys, values = [], []
            for layer in out.cache.layers:
                H, d = layer.keys.shape[1], layer.keys.shape[-1]
                gi = idx[:, None, :, None].expand(B, H, -1, d)
                keys.append(torch.gather(layer.keys, 2, gi))
                values.append(torch.gather(layer.values, 2, gi))
            hidden = torch.stack([h[rows, batch.prompt_last] for h in out.hidden_states[1:]], dim=1)
        importance = capture.stacked(self.num_layers) if capture is not None else None
        question = None
        if question_mask is not None:
            question = question_from_teacher(out.cache, out.last_hidden_state, question_mask)
        return TeacherOutput(
            ce=ce,
            cot_keys=torch.stack(keys, 1).detach(),
            cot_values=torch.stack(values, 1).detach(),
            cot_valid=batch.cot_valid,
            hidden=hidden.detach(),
            importance=importance,
            question=question,
        )

    # ---- student -----------------------------------------------------------
    def encode_questions(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q <bot>`` of each question, left-padded, on the model's device: (ids [B, Nq], mask [B, Nq])."""
        if isinstance(questions, str):
            questions = [questions]
        if not questions:
            raise ValueError("no questions")
        prefixes = [self.encoder.question_ids(q) for q in questions]
        ids = pad_rows(prefixes, self.encoder.pad, left=True).to(self.device)
        mask = pad_rows([[1] * len(p) for p in prefixes], 0, left=True).bool().to(self.device)
        return ids, mask

    def latent_reasoning(self, questions: list[str] | torch.Tensor, prefix_mask: torch.Tensor | None = None,
                         keep_history: bool = False, question: QuestionState | None = None) -> LatentTrace:
        """Pass 0 and the latent iterations (``latent.mode``, ``latent.num_tokens``, ``latent.num_iterations``).

        questions: a list of strings; or the left-padded ``Q <bot>`` ids [B, Nq] with ``prefix_mask`` [B, Nq]
        (as in a StudentBatch; an all-ones mask when omitted). Runs under the caller's grad mode (wrap it in
        ``torch.no_grad()`` to inspect). -> :class:`~kava.latent.LatentTrace`: ``.latents`` [B, M, D] are the
        latent inputs whose KV the answer attends to, ``.latent_kv`` {iteration: (K, V)} each
        [B, L, H_kv, M, d]. ``question``: the prefix already computed (the training step's shared pass).
        """
        if isinstance(questions, torch.Tensor):
            prefix_ids = questions
            if prefix_mask is None:
                prefix_mask = torch.ones_like(prefix_ids, dtype=torch.bool)
        else:
            if prefix_mask is not None:
                raise ValueError("prefix_mask goes with tensor inputs (prefix ids), not with question strings")
            prefix_ids, prefix_mask = self.encode_questions(questions)
        lat = self.cfg.latent
        return run_latents(
            self._decoder_fn(), self.embed, self.projection, prefix_ids, prefix_mask,
            self.special_ids["<latent>"], lat.num_tokens, lat.num_iterations, lat.mode, keep_history,
            question, self._fixed_pass(),
        )

    def student(self, batch: StudentBatch, use_latents: bool = True,
                question: QuestionState | None = None) -> StudentOutput:
        """Latent passes (or none, for No-CoT), then the answer pass ``<eot> P A <eos>``.

        question: ``Q <bot>`` already computed (by the teacher pass); else the student computes it.
        """
        if use_latents:
            trace = self.latent_reasoning(batch.prefix_ids, batch.prefix_mask, question=question)
            cache, past_mask, start = trace.cache, trace.mask, trace.next_position
        else:
            trace = None
            out, start = self._prefix_pass(batch.prefix_ids, batch.prefix_mask)
            cache, past_mask = out.cache, batch.prefix_mask
        ce, hidden = self.answer_pass(batch, cache, past_mask, start)
        return StudentOutput(ce=ce, hidden=hidden, trace=trace)

    def answer_pass(self, batch: StudentBatch, cache, past_mask, start) -> tuple[torch.Tensor, torch.Tensor]:
        """``<eot> P A <eos>`` on top of ``cache``: -> (answer CE, every layer's hidden state at the last P token)."""
        positions = positions_from_mask(batch.suffix_mask, start)
        out = self._decode(
            self.embed(batch.suffix_ids), torch.cat([past_mask, batch.suffix_mask], 1), positions, cache,
            output_hidden_states=True,
        )
        ce = masked_ce(out.last_hidden_state, batch.suffix_labels, self.lm_head, batch.label_index)
        hidden = torch.stack([h[:, batch.prompt_last] for h in out.hidden_states[1:]], dim=1)
        return ce, hidden

    # ---- the KaVa loss -----------------------------------------------------
    def compress_teacher_kv(self, t: TeacherOutput, generator: torch.Generator | None = None) -> CompressedKV:
        """The M kept teacher entries; with ``loss.kv_key_positions=slots`` keys are moved to the slot positions."""
        ev = self.cfg.eviction
        kept = compress_kv(
            t.cot_keys, t.cot_values, t.importance, t.cot_valid, self.cfg.latent.num_tokens,
            lam=ev.lam, method=ev.method, generator=generator, order=ev.order,
        )
        if self.cfg.loss.kv_key_positions == "slots":
            keys = rotate_keys(kept.keys, slot_shifts(kept.index), rotary_inv_freq(self.decoder_stack))
            kept = replace(kept, keys=keys)  # masked slots: zero keys, shift 0, still zero
        return kept

    def make_batches(self, examples: list[Example], teacher_only: bool = False
                     ) -> tuple[TeacherBatch | None, StudentBatch | None]:
        """Encode and collate ``examples`` as training does (:func:`kava.data.collate.make_batches`: the
        config's ``eviction.importance_queries`` and ``loss.student_ce_on_prompt``; only the batches
        ``method`` uses), on the model's device."""
        teacher, student = collate_examples(list(examples), self.encoder, self.cfg, teacher_only)
        return (teacher.to(self.device) if teacher is not None else None,
                student.to(self.device) if student is not None else None)

    def training_loss(self, teacher: list[Example] | TeacherBatch | None, student: StudentBatch | None = None,
                      generator: torch.Generator | None = None, teacher_only: bool = False,
                      student_weight: float = 1.0, log_metrics: bool = True, shares: LossShares | None = None):
        """-> (loss, metrics). Which terms exist depends on ``cfg.method``.

        teacher: a list of :class:`~kava.data.Example` (collated here with :meth:`make_batches`; leave
        ``student`` out), or the collated TeacherBatch (None for nocot) and ``student`` the StudentBatch
        (None for cot and teacher-only steps). generator: random eviction draws. ``teacher_only``: the
        teacher CE alone (the CoT curriculum). ``student_weight`` scales the student terms of the KaVa loss
        (``losses.total_loss``). ``shares``: this micro-batch's part of the step's global batch per term
        (:class:`~kava.losses.LossShares`; training passes them so that gradient accumulation gives the
        full-batch objective); None: the batch is the whole batch. ``model(...)`` (``forward``) is the same call.

        ``log_metrics=False`` skips the work whose only product is a metric: the KV losses of the latent
        iterations the loss does not supervise (``kv_loss_iter_{t}`` then exists for the supervised ones only),
        and with ``loss.alpha_kv=0`` (pccot, codi) the importance capture, the compression and the KV loss
        (``kv`` reads 0). The loss and every gradient are the same (tests/test_model.py); a training loop passes
        False off its logging steps. Importance is captured only when ``eviction`` reads it (rkv with lam > 0,
        importance), either way.
        """
        if isinstance(teacher, Example):
            teacher = [teacher]
        if isinstance(teacher, (list, tuple)):
            if not teacher or not all(isinstance(e, Example) for e in teacher):
                raise TypeError("training_loss: expected a non-empty list of Example, or collated batches")
            if student is not None:
                raise TypeError("training_loss: give a list of Example alone, or a TeacherBatch and a StudentBatch")
            teacher, student = self.make_batches(teacher, teacher_only)
        cfg = self.cfg
        method = cfg.method
        if method == "cot" or teacher_only:
            t = self.teacher(teacher, capture_importance=False)
            return total_loss(ce_student=None, ce_teacher=t.ce, student_h=None, teacher_h=None,
                              latent_kv={}, teacher_kv=None, cfg=cfg.loss, shares=shares)
        if method == "nocot":
            s = self.student(student, use_latents=False)
            return total_loss(ce_student=s.ce, ce_teacher=None, student_h=None, teacher_h=None,
                              latent_kv={}, teacher_kv=None, cfg=cfg.loss, shares=shares)
        ev = cfg.eviction
        kv_needed = cfg.loss.alpha_kv != 0 or log_metrics  # with alpha_kv = 0 the KV loss is a metric only
        t = self.teacher(teacher, capture_importance=kv_needed and needs_importance(ev.method, ev.lam),
                         question_mask=student.prefix_mask if cfg.train.share_question_pass else None)
        s = self.student(student, question=t.question)
        latent_kv, compressed = {}, None
        if kv_needed:
            compressed = self.compress_teacher_kv(t, generator)
            latent_kv = s.trace.latent_kv if log_metrics else supervised_kv(s.trace.latent_kv, cfg.loss.kv_supervision)
        return total_loss(
            ce_student=s.ce, ce_teacher=t.ce, student_h=s.hidden, teacher_h=t.hidden,
            latent_kv=latent_kv, teacher_kv=compressed, cfg=cfg.loss, student_weight=student_weight,
            shares=shares,
        )

    def forward(self, *args, **kwargs):
        """:meth:`training_loss`: ``model(examples)`` or ``model(teacher, student, ...)`` -> (loss, metrics).

        So DDP, FSDP and accelerate's ``prepare`` wrap the KavaModel itself, and HF-style loops read the loss
        as ``outputs[0]``.
        """
        return self.training_loss(*args, **kwargs)

    # ---- generation --------------------------------------------------------
    @contextlib.contextmanager
    def merged_token_rows(self):
        """Write peft's trainable-token rows into the embedding for the duration (restored after).

        Merged, every decode step is a plain embedding / linear call. Unmerged, peft's own forward copied the
        whole V x D matrix per call, a third of batch-1 decoding time (docs/perf.md); the row forward of
        ``kava/token_rows.py`` does not, but still adds a few small ops per call.
        """
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        layers = [m for m in self.lm.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
        for m in layers:
            m.merge()
        try:
            yield
        finally:
            for m in layers:
                if m.merged:
                    m.unmerge()

    @torch.no_grad()
    def generate(self, questions: list[str], mode: str = "latent", max_new_tokens: int | None = None
                 ) -> list["Generation"]:
        """Greedy, batched, batch-invariant generation: one :class:`Generation` per question.

        mode: ``latent`` (latents, then ``<eot> P`` and the answer), ``direct`` (no latents: No-CoT),
        ``cot`` (teacher mode: write C <eot> P A). Each result has ``.text``, ``.answer`` (the number read
        from the answer part, or None), ``.forward_passes``, ``.tokens``, ``.kv_bytes`` and, in latent mode,
        ``.latents`` [M, D]. ``max_new_tokens``: default ``eval.max_answer_tokens`` (``eval.max_cot_tokens`` in cot).
        """
        if isinstance(questions, str):
            questions = [questions]
        return self.generate_batch(questions, mode, max_new_tokens).split(questions, mode, self.cfg.data.answer_prompt)

    @torch.no_grad()
    def generate_batch(self, questions: list[str], mode: str = "latent", max_new_tokens: int | None = None
                       ) -> "GenerationBatch":
        """:meth:`generate` as columns (lists per question, latents [B, M, D]), for benchmarks."""
        with self.merged_token_rows():
            return self._generate(questions, mode, max_new_tokens)

    def _generate(self, questions: list[str], mode: str, max_new_tokens: int | None) -> "GenerationBatch":
        if mode not in ("latent", "direct", "cot"):
            raise ValueError(f"mode={mode!r}: expected latent, direct or cot")
        ev = self.cfg.eval
        enc = self.encoder
        device = self.device
        prefix_ids, prefix_mask = self.encode_questions(questions)
        B = len(questions)
        trace = None
        if mode == "cot":
            out, pos = self._prefix_pass(prefix_ids, prefix_mask)
            cache, mask, calls = out.cache, prefix_mask, 1
            last_hidden = out.last_hidden_state[:, -1]
            budget = max_new_tokens or ev.max_cot_tokens
        else:
            if mode == "latent":
                trace = self.latent_reasoning(prefix_ids, prefix_mask)
                cache, mask, pos, calls = trace.cache, trace.mask, trace.next_position, trace.forward_passes
            else:
                out, pos = self._prefix_pass(prefix_ids, prefix_mask)
                cache, mask, calls = out.cache, prefix_mask, 1
            prompt = torch.tensor([enc.eot] + enc.prompt_ids, device=device).expand(B, -1)
            p = prompt.shape[1]
            mask = torch.cat([mask, mask.new_ones(B, p)], 1)
            out = self._decode(self.embed(prompt), mask, pos[:, None] + torch.arange(p, device=device), cache)
            cache, pos, last_hidden, calls = out.cache, pos + p, out.last_hidden_state[:, -1], calls + 1
            budget = max_new_tokens or ev.max_answer_tokens
        tokens, lengths = self._greedy(last_hidden, cache, mask, pos, budget)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        cfgm = self.config
        head_dim = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
        bytes_per_token = 2 * cfgm.num_hidden_layers * cfgm.num_key_value_heads * head_dim * next(self.parameters()).element_size()
        valid_prompt = mask.long().sum(-1).tolist()  # cache entries before decoding
        return GenerationBatch(
            texts=texts,
            token_ids=tokens,
            # `calls` passes produced the first token; each later token costs one more.
            forward_passes=[calls + n - 1 for n in lengths],
            generated_tokens=lengths,
            kv_bytes=[(v + n - 1) * bytes_per_token for v, n in zip(valid_prompt, lengths)],
            latents=trace.latents if trace is not None else None,
        )

    def _greedy(self, last_hidden, cache, mask, pos, max_new: int) -> tuple[list[list[int]], list[int]]:
        """Greedy decoding until EOS per row; rows that finished keep running but are ignored."""
        eos = self.encoder.eos
        B = last_hidden.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=last_hidden.device)
        out_tokens: list[torch.Tensor] = []
        tok = self.lm_head(last_hidden).argmax(-1)
        for step in range(max_new):
            out_tokens.append(torch.where(done, torch.full_like(tok, -1), tok))
            done = done | (tok == eos)
            if bool(done.all()) or step == max_new - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = self._decode(self.embed(tok[:, None]), mask, pos[:, None], cache)
            cache, pos = out.cache, pos + 1
            tok = self.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        seqs = torch.stack(out_tokens, 1).tolist()
        tokens, lengths = [], []
        for row in seqs:
            row = [t for t in row if t != -1]
            lengths.append(len(row))
            tokens.append([t for t in row if t != eos])
        return tokens, lengths

    # ---- save / load -------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> Path:
        """Write a KaVa checkpoint: adapter (or full weights) + projection as safetensors, tokenizer, resolved
        config, metadata (layout: docs/design.md). Reload it with :meth:`from_pretrained`.

        ``state_dict``: write these weights instead of the module's own, ``{"lm": {model.lm state-dict key:
        tensor}, "projection": {...}}`` (a sharded run's gathered full state, :func:`kava.sharding.full_model_state`).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.cfg.to_yaml(d / "config.yaml")
        self.tokenizer.save_pretrained(d / "tokenizer")
        lm_state = {} if state_dict is None else {"state_dict": state_dict["lm"]}
        if self.cfg.lora.enabled:
            # New rows are re-derived on load (mean init), the trainable-token deltas live in the adapter.
            self.lm.save_pretrained(d / "adapter", safe_serialization=True, save_embedding_layers=False, **lm_state)
        else:
            self.lm.save_pretrained(d / "model", safe_serialization=True, **lm_state)
        if self.projection.enabled:
            projection = self.projection.state_dict() if state_dict is None else state_dict["projection"]
            save_file({k: v.detach().contiguous() for k, v in projection.items()}, d / "projection.safetensors")
        (d / "kava_meta.json").write_text(json.dumps(self.metadata(), indent=1))
        return d

    # Kept as an alias: kava.checkpoint.save_checkpoint and kava.export write these same files through
    # ``save`` (then add optimizer / scheduler / RNG state and the checksum marker).
    save = save_pretrained

    def metadata(self) -> dict:
        return {
            "format_version": 1,
            "backbone": self.cfg.model.name_or_path,
            "hidden_size": self.config.hidden_size,
            "num_layers": self.config.num_hidden_layers,
            "vocab_size": len(self.tokenizer),
            "num_latent_tokens": self.cfg.latent.num_tokens,
            "use_projection": self.cfg.latent.use_projection,
            "lora": self.cfg.lora.enabled,
        }

    @classmethod
    def load(cls, directory: str | Path, expect: KavaConfig | None = None, is_trainable: bool = False,
             config: KavaConfig | None = None) -> "KavaModel":
        """Load a KaVa checkpoint directory (:meth:`save_pretrained`, a training checkpoint, ``kava export``).

        Kept beside :meth:`from_pretrained` (which calls it) as the strict loader: a checkpoint directory
        only, never a hub id or a bare backbone, so a wrong path fails here instead of being looked up on the
        hub. The files are verified first. ``expect``: refuse a checkpoint whose architecture keys differ.
        ``config``: replaces the saved config; it must agree with it on :data:`WEIGHT_KEYS`.
        """
        d = Path(directory)
        for need in ("config.yaml", "kava_meta.json", "tokenizer"):
            if not (d / need).exists():
                raise FileNotFoundError(f"{d}: not a KaVa checkpoint (missing {need})")
        from kava.checkpoint import verify_for_loading

        verify_for_loading(d)  # a corrupt file: CheckpointError naming it, before anything is read
        cfg = KavaConfig.from_yaml(d / "config.yaml")
        meta = json.loads((d / "kava_meta.json").read_text())
        if expect is not None:
            for key, mine, theirs in [
                ("model.name_or_path", expect.model.name_or_path, cfg.model.name_or_path),
                ("latent.num_tokens", expect.latent.num_tokens, cfg.latent.num_tokens),
                ("latent.use_projection", expect.latent.use_projection, cfg.latent.use_projection),
                ("lora.enabled", expect.lora.enabled, cfg.lora.enabled),
                ("lora.r", expect.lora.r, cfg.lora.r),
            ]:
                if mine != theirs:
                    raise ConfigError(f"{d}: checkpoint has {key}={theirs!r} but this run has {key}={mine!r}; refusing to load")
        if config is not None:
            for key in WEIGHT_KEYS:
                mine, theirs = config_value(config, key), config_value(cfg, key)
                if mine != theirs:
                    raise ConfigError(f"{d}: checkpoint has {key}={theirs!r} but the given config has {key}={mine!r}; "
                                      "it defines the saved weights, refusing to load")
            cfg = config.resolved()
        # The initial values are overwritten by the saved ones: draw them without touching the caller's RNG.
        with seeded_rng(cfg.train.seed):
            if cfg.lora.enabled:
                from peft import PeftModel

                base, tokenizer = load_backbone(cfg.model, tokenizer_path=d / "tokenizer")
                special = add_special_tokens(base, tokenizer)
                lm = PeftModel.from_pretrained(base, d / "adapter", is_trainable=is_trainable)
            else:
                base, tokenizer = load_backbone(replace(cfg.model, name_or_path=str(d / "model")),
                                                tokenizer_path=d / "tokenizer")
                special = add_special_tokens(base, tokenizer)
                lm = base
            model = cls(cfg, lm, tokenizer, special)
        if model.config.hidden_size != meta["hidden_size"] or len(tokenizer) != meta["vocab_size"]:
            raise ConfigError(f"{d}: checkpoint metadata {meta} does not match the loaded backbone")
        if model.projection.enabled:
            state = load_file(d / "projection.safetensors")
            model.projection.load_state_dict(state)
        return model


def _config_for_backbone(model: nn.Module, config: KavaConfig | None) -> KavaConfig:
    """``config`` (default: KavaConfig for this backbone) with the backbone's actual dtype and attention kernel,
    resolved (:meth:`KavaConfig.resolved`)."""
    loaded_from = str(getattr(model, "name_or_path", "") or "")
    if config is None:
        config = KavaConfig()
        if loaded_from:
            config = replace(config, model=replace(config.model, name_or_path=loaded_from))
        else:
            log.warning("from_backbone: the backbone has no name_or_path and no config was given; "
                        "model.name_or_path stays %r", config.model.name_or_path)
    elif loaded_from and not _names_backbone(config.model, loaded_from):
        log.warning("from_backbone: config.model.name_or_path=%r but the backbone was loaded from %r; a checkpoint "
                    "saved with LoRA reloads its base from the config's name", config.model.name_or_path, loaded_from)
    changes = {}
    dtype = next((name for name, dt in DTYPES.items() if dt == model.dtype), None)
    if dtype is None:
        log.warning("from_backbone: backbone dtype %s is not one of %s; model.dtype stays %r",
                    model.dtype, ", ".join(DTYPES), config.model.dtype)
    elif dtype != config.model.dtype:
        changes["dtype"] = dtype
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn.startswith(CAPTURE_PREFIX):
        attn = attn[len(CAPTURE_PREFIX):]
    if attn != "eager" and attn != config.model.attn_implementation:
        changes["attn_implementation"] = attn
    if changes:
        config = replace(config, model=replace(config.model, **changes))
    return config.resolved()  # what `method` implies (pccot/codi: no KV loss; codi: sequential), as training does


def _names_backbone(model_cfg, loaded_from: str) -> bool:
    name = model_cfg.name_or_path
    if name == loaded_from:
        return True
    if name == OFFLINE_SMOLLM2:  # loaded from its converted copy
        return Path(loaded_from).name == "smollm2-135m-instruct"
    a, b = Path(name).expanduser(), Path(loaded_from).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


@dataclass
class Generation:
    """One question's generation (:meth:`KavaModel.generate`).

    text: the decoded text (special tokens dropped): after ``<eot> P`` in latent/direct mode, the CoT and
    all that follows in cot mode. answer: the number read from the answer part (``kava.answers.extract_answer``;
    in cot mode what follows the first answer prompt), or None. tokens: generated tokens (EOS counted);
    token_ids: them without EOS. forward_passes: model calls for this question. kv_bytes: the KV cache it
    held. latents: [M, D], the latents whose KV the answer attended to (latent mode), else None.
    """

    question: str
    text: str
    answer: float | None
    forward_passes: int
    tokens: int
    kv_bytes: int
    token_ids: list[int] = field(repr=False)
    latents: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class GenerationBatch:
    """A batch's generation as columns (:meth:`KavaModel.generate_batch`); latents [B, M, D] or None."""

    texts: list[str]
    token_ids: list[list[int]]
    forward_passes: list[int]
    generated_tokens: list[int]
    kv_bytes: list[int]
    latents: torch.Tensor | None

    def split(self, questions: list[str], mode: str, answer_prompt: str) -> list[Generation]:
        """One :class:`Generation` per question, with the answer parsed."""
        from kava.answers import extract_answer
        from kava.evaluate import answer_text

        out = []
        for i, q in enumerate(questions):
            part = answer_text(self.texts[i], mode, answer_prompt)
            out.append(Generation(
                question=q, text=self.texts[i], answer=extract_answer(part) if part is not None else None,
                forward_passes=self.forward_passes[i], tokens=self.generated_tokens[i], kv_bytes=self.kv_bytes[i],
                token_ids=self.token_ids[i], latents=self.latents[i] if self.latents is not None else None,
            ))
        return out
