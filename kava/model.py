"""KavaModel: one backbone, two modes (teacher, student), the KaVa training loss, generation, save/load."""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kava.attention import ImportanceCapture
from kava.backbone import LatentProjection, add_special_tokens, apply_lora, load_backbone
from kava.config import ConfigError, KavaConfig
from kava.data.collate import IGNORE, StudentBatch, TeacherBatch, Tokenizer, pad_rows, positions_from_mask
from kava.eviction import CompressedKV, compress_kv
from kava.latent import LatentTrace, QuestionState, run_latents
from kava.rope import rotary_inv_freq, rotate_keys, slot_shifts
from kava.losses import total_loss

log = logging.getLogger(__name__)


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


def masked_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean CE over labelled tokens; logits only at the positions that predict a label.

    hidden [B, N, D]; labels [B, N] (label i is predicted from position i-1).
    """
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where])


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
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.encoder = Tokenizer(tokenizer, special_ids, cfg.data.answer_prompt)
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.decoder_stack = base.model
        self.lm_head = base.lm_head
        self.config = base.config
        self.projection = LatentProjection(self.config.hidden_size, cfg.latent.use_projection)
        if cfg.latent.projection_scale == "embedding":
            self.projection.match_embedding_scale(base.get_input_embeddings().weight)

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: KavaConfig) -> "KavaModel":
        torch.manual_seed(cfg.train.seed)
        base, tokenizer = load_backbone(cfg.model)
        special = add_special_tokens(base, tokenizer)
        lm = apply_lora(base, cfg.lora, list(special.values()))
        return cls(cfg, lm, tokenizer, special)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

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
        ce = masked_ce(out.last_hidden_state, batch.labels, self.lm_head)
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
    def latent_reasoning(self, prefix_ids, prefix_mask, keep_history: bool = False,
                         question: QuestionState | None = None) -> LatentTrace:
        lat = self.cfg.latent
        return run_latents(
            self._decoder_fn(), self.embed, self.projection, prefix_ids, prefix_mask,
            self.special_ids["<latent>"], lat.num_tokens, lat.num_iterations, lat.mode, keep_history,
            question,
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
        ce = masked_ce(out.last_hidden_state, batch.suffix_labels, self.lm_head)
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

    def training_loss(self, teacher: TeacherBatch | None, student: StudentBatch | None,
                      generator: torch.Generator | None = None, teacher_only: bool = False,
                      student_weight: float = 1.0):
        """-> (loss, metrics). Which terms exist depends on ``cfg.method``; ``student_weight`` scales
        the student terms of the KaVa loss (``losses.total_loss``)."""
        cfg = self.cfg
        method = cfg.method
        if method == "cot" or teacher_only:
            t = self.teacher(teacher, capture_importance=False)
            return total_loss(ce_student=None, ce_teacher=t.ce, student_h=None, teacher_h=None,
                              latent_kv={}, teacher_kv=None, cfg=cfg.loss)
        if method == "nocot":
            s = self.student(student, use_latents=False)
            return total_loss(ce_student=s.ce, ce_teacher=None, student_h=None, teacher_h=None,
                              latent_kv={}, teacher_kv=None, cfg=cfg.loss)
        t = self.teacher(teacher, capture_importance=cfg.eviction.method in ("rkv", "importance"),
                         question_mask=student.prefix_mask if cfg.train.share_question_pass else None)
        s = self.student(student, question=t.question)
        compressed = self.compress_teacher_kv(t, generator)
        return total_loss(
            ce_student=s.ce, ce_teacher=t.ce, student_h=s.hidden, teacher_h=t.hidden,
            latent_kv=s.trace.latent_kv, teacher_kv=compressed, cfg=cfg.loss, student_weight=student_weight,
        )

    # ---- generation --------------------------------------------------------
    @contextlib.contextmanager
    def merged_token_rows(self):
        """Write peft's trainable-token rows into the embedding for the duration (restored after).

        Unmerged, every embedding / tied-LM-head call copies the whole V x D matrix (peft's
        ``get_merged_weights``): a third of batch-1 decoding time (docs/perf.md).
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
    def generate(self, questions: list[str], mode: str = "latent", max_new_tokens: int | None = None) -> "Generation":
        """Greedy, batched, batch-invariant generation.

        mode: ``latent`` (latents, then ``<eot> P`` and the answer), ``direct`` (no latents: No-CoT),
        ``cot`` (teacher mode: write C <eot> P A).
        """
        with self.merged_token_rows():
            return self._generate(questions, mode, max_new_tokens)

    def _generate(self, questions: list[str], mode: str, max_new_tokens: int | None) -> "Generation":
        if mode not in ("latent", "direct", "cot"):
            raise ValueError(f"mode={mode!r}: expected latent, direct or cot")
        ev = self.cfg.eval
        enc = self.encoder
        prefixes = [enc.question_ids(q) for q in questions]
        device = next(self.parameters()).device
        prefix_ids = pad_rows(prefixes, enc.pad, left=True).to(device)
        prefix_mask = pad_rows([[1] * len(p) for p in prefixes], 0, left=True).bool().to(device)
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
        return Generation(
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
    def save(self, directory: str | Path) -> Path:
        """Adapter (or full weights) + projection as safetensors, tokenizer, resolved config, metadata."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.cfg.to_yaml(d / "config.yaml")
        self.tokenizer.save_pretrained(d / "tokenizer")
        if self.cfg.lora.enabled:
            # New rows are re-derived on load (mean init), the trainable-token deltas live in the adapter.
            self.lm.save_pretrained(d / "adapter", safe_serialization=True, save_embedding_layers=False)
        else:
            self.lm.save_pretrained(d / "model", safe_serialization=True)
        if self.projection.enabled:
            save_file({k: v.detach().contiguous() for k, v in self.projection.state_dict().items()}, d / "projection.safetensors")
        (d / "kava_meta.json").write_text(json.dumps(self.metadata(), indent=1))
        return d

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
    def load(cls, directory: str | Path, expect: KavaConfig | None = None, is_trainable: bool = False) -> "KavaModel":
        """Load a checkpoint written by :meth:`save`; refuse one that does not match ``expect``."""
        d = Path(directory)
        for need in ("config.yaml", "kava_meta.json", "tokenizer"):
            if not (d / need).exists():
                raise FileNotFoundError(f"{d}: not a KaVa checkpoint (missing {need})")
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
        if cfg.lora.enabled:
            from peft import PeftModel

            base, tokenizer = load_backbone(cfg.model, tokenizer_path=d / "tokenizer")
            special = add_special_tokens(base, tokenizer)
            lm = PeftModel.from_pretrained(base, d / "adapter", is_trainable=is_trainable)
        else:
            from dataclasses import replace

            base, tokenizer = load_backbone(replace(cfg.model, name_or_path=str(d / "model")), tokenizer_path=d / "tokenizer")
            special = add_special_tokens(base, tokenizer)
            lm = base
        model = cls(cfg, lm, tokenizer, special)
        if model.config.hidden_size != meta["hidden_size"] or len(tokenizer) != meta["vocab_size"]:
            raise ConfigError(f"{d}: checkpoint metadata {meta} does not match the loaded backbone")
        if model.projection.enabled:
            state = load_file(d / "projection.safetensors")
            model.projection.load_state_dict(state)
        return model


@dataclass
class Generation:
    """Per question: decoded text (special tokens dropped), token ids, forward passes, tokens, KV bytes."""

    texts: list[str]
    token_ids: list[list[int]]
    forward_passes: list[int]
    generated_tokens: list[int]
    kv_bytes: list[int]
    latents: torch.Tensor | None
