"""LLaVA-Mini: vision encoder -> compressor -> projector -> pre-fusion -> LLM (DESIGN.md §1).

A batch (docs/internals.md) mixes images, high-resolution images, videos and text-only samples.
Every image / video frame is one *media unit*:

    encoder (frozen, no grad)   pixels [V, 3, H, W] -> H_v [V, N, D]
    compressor                  H_v of a unit -> [C², D]          (hi-res: the R×R crops stitched to one grid)
    projector                   applied to H_v and to the compressed tokens -> width d
    pre-fusion (depth > 0)      [proj(H_v) | proj(compressed) | non-answer text] -> fused C² tokens, fused text
    LLM                         [fused text before <image> | T·C² tokens | fused text after, raw answers]

A video's T frames are fused one by one with the same text; the fused text is averaged over
frames and the T·C² tokens go in time order at the sample's single ``IMAGE_TOKEN_INDEX`` slot.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm_mini.config import ModelConfig, check_fields
from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.models.attention import backend_for_build, resolve_backends
from lm_mini.models.encoders import build_encoder, normalize_pixels, plain, views_per_image
from lm_mini.models.llm import decoder_layers
from lm_mini.models.prefusion import PreFusion
from lm_mini.registry import COMPRESSORS, LLMS, PROJECTORS

Batch = Dict[str, Any]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens; exactly 0 (with a graph) when none is labelled.

    logits [B, S, V], labels [B, S] (IGNORE_INDEX = no loss).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class LlavaMini(nn.Module):
    """The whole model. Parts are attributes named like ``train.parts``:
    ``encoder``, ``projector``, ``compressor``, ``prefusion`` (None at depth 0), ``llm``."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        compressor: nn.Module,
        llm: nn.Module,
        prefusion: Optional[PreFusion] = None,
        resolution_ratio: int = 1,
        detach_prefusion_text: bool = True,
        video_hires: bool = False,
        text_only_blank_image: bool = False,
        skip_token_id_0: bool = False,
        train_input_embeddings: bool = True,
    ):
        super().__init__()
        self.detach_prefusion_text = detach_prefusion_text
        self.skip_token_id_0 = skip_token_id_0  # official quirk: id 0 ("!" in Llama-3) is never fused
        self.train_input_embeddings = train_input_embeddings  # False: text embeddings detached (official)
        self.video_hires = video_hires  # at R > 1 a video frame has 1 + R² views, like an image (official)
        self.text_only_blank_image = text_only_blank_image  # training: fuse text-only samples with a blank image
        self.encoder, self.projector, self.compressor, self.prefusion, self.llm = encoder, projector, compressor, prefusion, llm
        if resolution_ratio < 1:
            raise ValueError(f"model.resolution_ratio must be >= 1, got {resolution_ratio}")
        self.resolution_ratio = resolution_ratio
        self._check_parts()

    @classmethod
    def from_config(cls, cfg: Any) -> "LlavaMini":
        """Build from a ``ModelConfig`` node. Works under ``with torch.device("meta")`` (no weight memory).

        The encoder comes frozen (``requires_grad=False``), as in LLaVA; the training module may unfreeze it.
        """
        check_fields(cfg, ModelConfig, "model.", "model config")  # the config's own rules: one made in code arrives unchecked
        # One attention backend for the encoder, the LLM and pre-fusion (whose layers are the LLM's class and
        # read its config); refused here, before any weight exists, when it cannot run on this machine.
        encoder_attn, llm_attn = resolve_backends(cfg)
        llm_key = "model.llm.attn_implementation" if getattr(cfg.llm, "attn_implementation", None) else "model.attn_implementation"
        encoder_attn = backend_for_build(encoder_attn, "model.attn_implementation")
        llm_attn = backend_for_build(llm_attn, llm_key)
        encoder = build_encoder(cfg.encoder, attn_implementation=encoder_attn)
        encoder.requires_grad_(False)
        llm_cfg = plain(cfg.llm.config)
        with _naming("model.llm", f"name={cfg.llm.name}, model_type={llm_cfg.get('model_type')}, path={cfg.llm.path}"):
            llm = LLMS.create(cfg.llm.name, config=llm_cfg, path=cfg.llm.path, attn_implementation=llm_attn)
        width = llm.get_input_embeddings().embedding_dim
        projector = PROJECTORS.create(cfg.projector.name, encoder.hidden_size, width)
        options = plain(cfg.compressor.options)
        with _naming("model.compressor", f"name={cfg.compressor.name}, grid={cfg.compressor.grid}, options={options}"):
            compressor = COMPRESSORS.create(cfg.compressor.name, dim=encoder.hidden_size, grid=cfg.compressor.grid, **options)
        prefusion = PreFusion.from_llm(llm, cfg.prefusion.depth, cfg.prefusion.init) if cfg.prefusion.depth > 0 else None
        model = cls(encoder, projector, compressor, llm, prefusion, resolution_ratio=cfg.resolution_ratio,
                    detach_prefusion_text=getattr(cfg.prefusion, "detach_text", True),
                    video_hires=bool(getattr(cfg, "video_hires", False)),
                    text_only_blank_image=bool(getattr(cfg.prefusion, "text_only_blank_image", False)),
                    skip_token_id_0=bool(getattr(cfg.prefusion, "skip_token_id_0", False)),
                    train_input_embeddings=bool(getattr(cfg.llm, "train_input_embeddings", True)))
        return model.to(getattr(torch, cfg.dtype))

    def block_stacks(self) -> Dict[str, nn.Module]:
        """Each part's repeated transformer blocks, as the part names them (encoder, pre-fusion, LLM order): the
        FSDP units and what activation checkpointing recomputes. A part without such a stack (a user encoder
        whose ``blocks`` is None) is left out: FSDP shards it with the root."""
        stacks = {"encoder": getattr(self.encoder, "blocks", None),
                  "prefusion": self.prefusion.blocks if self.prefusion is not None else None,
                  "llm": decoder_layers(self.llm)}
        return {name: stack for name, stack in stacks.items() if stack is not None}

    def _check_parts(self) -> None:
        """Refuse part combinations that cannot work, at build time, with what to change."""
        n_tokens, grid = self.encoder.grid**2, self.encoder.grid
        n_prefix = getattr(self.encoder, "num_prefix_tokens", 0)
        c2 = getattr(self.compressor, "num_tokens", None)
        if n_prefix and (c2 is not None or self.resolution_ratio > 1):
            raise ValueError(
                f"encoder {type(self.encoder).__name__} keeps {n_prefix} prefix (CLS) token(s) besides its {grid}x{grid} "
                "patch grid (model.encoder.select_feature=cls_patch); the compressors and the high-resolution stitching "
                "take the patch grid only (cls_patch works with the identity compressor at resolution_ratio 1, as in "
                "LLaVA-1.5): set model.encoder.select_feature=patch"
            )
        if c2 is not None and c2 > n_tokens:
            raise ValueError(
                f"compressor {type(self.compressor).__name__} emits C*C = {c2} tokens per image, more than the encoder's "
                f"{n_tokens} patch tokens ({grid}x{grid}); set model.compressor.grid <= {grid}"
            )
        width = self.llm.get_input_embeddings().embedding_dim
        param = next(self.projector.parameters(), None)
        probe = torch.zeros(1, 1, self.encoder.hidden_size, device=param.device if param is not None else None,
                            dtype=param.dtype if param is not None else None)
        with torch.no_grad():
            out_width = self.projector(probe).shape[-1]  # one token: cheap even at 7B sizes, free on meta
        if out_width != width:
            raise ValueError(
                f"projector {type(self.projector).__name__} maps {self.encoder.hidden_size} -> {out_width}, "
                f"but the LLM's hidden size is {width}; the projector must output the LLM's width"
            )

    # ------------------------------------------------------------------ media
    @property
    def views_per_image(self) -> int:
        return views_per_image(self.resolution_ratio)

    def _media_units(self, batch: Batch) -> Tuple[List[int], List[int]]:
        """Split the batch's views into media units: (views per unit, sample of each unit), in batch order.

        An image is one unit of ``views_per_image`` views; a video one unit per frame, of one view
        (``views_per_image`` with ``video_hires``, as official LLaVA-Mini splits every frame at R > 1).
        """
        frames = batch["frames_per_sample"].tolist()
        is_video = batch.get("is_video")
        is_video = is_video.tolist() if is_video is not None else [False] * len(frames)
        views_per_image = self.views_per_image
        views, owner = [], []
        for b, (t, video) in enumerate(zip(frames, is_video)):
            if t and not video and t != 1:
                raise ValueError(f"sample {_name(batch, b)}: an image sample has frames_per_sample 1, got {t}")
            per_unit = views_per_image if (self.video_hires or not video) else 1
            views += [per_unit] * t
            owner += [b] * t
        n_views = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
        if sum(views) != n_views:
            raise ValueError(
                f"pixel_values holds {n_views} views but frames_per_sample {frames} (is_video {is_video}, "
                f"resolution_ratio {self.resolution_ratio}, video_hires {self.video_hires}) needs {sum(views)}"
            )
        return views, owner

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [V, 3, H, W] -> [V, N, D]; no graph through a frozen encoder.

        uint8 pixels (the data loader's) are raw RGB, normalised here with the encoder's mean/std;
        float pixels are taken as already normalised (as Hugging Face processors return them).
        """
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels, self.encoder.image_mean, self.encoder.image_std)
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats = self.encoder(pixels)
        n_prefix = getattr(self.encoder, "num_prefix_tokens", 0)
        if feats.shape[1] != self.encoder.grid**2 + n_prefix:
            raise ValueError(
                f"encoder returned {feats.shape[1]} tokens per view, not its {self.encoder.grid}x{self.encoder.grid} patch grid"
                + (f" plus {n_prefix} prefix token(s)" if n_prefix else "") + "; compressors need model.encoder.select_feature=patch"
            )
        return feats

    def encode_media(
        self, batch: Batch, text: torch.Tensor, text_mask: torch.Tensor, blank_text_only: bool = False
    ) -> Tuple[List[Optional[torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Compress (and pre-fuse) every media unit of the batch.

        text [B, L, d] and text_mask [B, L] are what pre-fusion may read. ``blank_text_only``: every text-only
        sample (padding samples aside) gets one more unit, an all-zero image of ``views_per_image`` views in
        normalised pixel space (official training's ``torch.zeros(1, 3, H, W)`` processor output), with which
        its text is fused; that unit's tokens are dropped (the sample has no media slot). Returns
        ``media`` (per sample: [T·C², d] in time order, None for text-only), ``fused_text`` [B, L, d]
        (mean over the sample's units; undefined for samples without a unit) and ``fused`` [B] (has a unit).
        """
        B = text.shape[0]
        views, owner = self._media_units(batch)
        media: List[Optional[torch.Tensor]] = [None] * B
        fused_sum = torch.zeros(text.shape, dtype=torch.float32, device=text.device)
        pixels, n_real = batch.get("pixel_values"), len(views)
        if blank_text_only and self.prefusion is not None:
            ids, frames = batch.get("sample_ids"), batch["frames_per_sample"].tolist()
            blank = [b for b in range(B) if not frames[b] and (ids is None or ids[b] is not None)]
            if blank:
                per, size = self.views_per_image, self.encoder.image_size
                zeros = torch.zeros(len(blank) * per, 3, size, size, device=text.device)
                if pixels is not None and pixels.dtype == torch.uint8:
                    pixels = normalize_pixels(pixels, self.encoder.image_mean, self.encoder.image_std)
                pixels = zeros if pixels is None else torch.cat([pixels, zeros.to(pixels.device, pixels.dtype)])
                views, owner = views + [per] * len(blank), owner + blank
        if not views:
            return media, fused_sum.to(text.dtype), torch.zeros(B, dtype=torch.bool, device=text.device)
        feats = self._encode(pixels)  # [V, N, D]
        g, R = self.encoder.grid, self.resolution_ratio
        starts = torch.tensor([0] + views[:-1], device=feats.device).cumsum(0)
        per_unit: List[Optional[torch.Tensor]] = [None] * len(views)
        for group_views in sorted(set(views)):  # at most two groups: single views and hi-res images
            units = [u for u, v in enumerate(views) if v == group_views]
            idx = starts[units]
            prefix = None
            if group_views == 1:
                visual = feats[idx]  # [U, P + N, D]; P prefix (CLS) tokens only with identity + cls_patch
                n_prefix = visual.shape[1] - g * g
                comp_in, hw = visual[:, n_prefix:], (g, g)  # [U, N, D]
                prefix = visual[:, :n_prefix] if n_prefix else None
            else:
                unit = feats[idx[:, None] + torch.arange(group_views, device=feats.device)]  # [U, 1+R², N, D]
                glob, crops = unit[:, 0], unit[:, 1:]
                # crop (i, j) row-major -> one (R·g) x (R·g) patch grid, row-major (official stitching)
                comp_in = crops.reshape(len(units), R, R, g, g, -1).transpose(2, 3).reshape(len(units), R * g * R * g, -1)
                hw = (R * g, R * g)
                visual = torch.cat([comp_in, glob], dim=1)  # official order: stitched crops, then global view
            compressed = self.compressor(comp_in, grid_hw=hw)  # [U, C², D]
            if prefix is not None:  # LLaVA-1.5 cls_patch: CLS, then the patch tokens
                compressed = torch.cat([prefix, compressed], dim=1)
            compressed = self.projector(compressed)  # [U, C², d]
            if self.prefusion is not None:
                sample = torch.tensor([owner[u] for u in units], device=text.device)
                compressed, fused = self.prefusion(self.projector(visual), compressed, text[sample], text_mask[sample])
                fused_sum.index_add_(0, sample, fused.float())
            for u, tokens in zip(units, compressed):
                per_unit[u] = tokens
        counts = torch.bincount(torch.tensor(owner, device=text.device), minlength=B)  # units per sample
        for b in set(owner[:n_real]):
            media[b] = torch.cat([per_unit[u] for u, o in enumerate(owner[:n_real]) if o == b])  # [T·C², d], time order
        fused_text = (fused_sum / counts.clamp(min=1)[:, None, None]).to(text.dtype)
        return media, fused_text, counts > 0

    # ------------------------------------------------------------------ LLM inputs
    def prepare_inputs(
        self, batch: Batch, padding_side: str = "right", blank_text_only: Optional[bool] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The LLM's ``inputs_embeds [B, S, d], attention_mask [B, S], position_ids [B, S], labels [B, S] | None``.

        Each sample's ``IMAGE_TOKEN_INDEX`` is replaced by its T·C² media tokens; sequences are
        re-padded on ``padding_side`` (left for generation). ``blank_text_only``: fuse text-only samples with
        a blank image (see :meth:`encode_media`); default: ``text_only_blank_image`` in training mode only.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"].bool()
        labels = batch.get("labels")
        B = input_ids.shape[0]
        if batch.get("frames_per_sample") is None:
            batch = {**batch, "frames_per_sample": torch.zeros(B, dtype=torch.long)}
        is_image = (input_ids == IMAGE_TOKEN_INDEX) & attention_mask
        n_media = batch["frames_per_sample"].tolist()
        for b in range(B):
            n_slots = int(is_image[b].sum())
            if n_slots != (1 if n_media[b] else 0):
                kind = "text-only (no media)" if not n_media[b] else f"with {n_media[b]} frame(s) of media"
                raise ValueError(
                    f"sample {_name(batch, b)}: {n_slots} <image> placeholder(s) in input_ids for a sample {kind}; "
                    f"expected {1 if n_media[b] else 0}"
                )

        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.clamp(min=0))  # [B, L, d]; the <image> slot is dropped below
        # Official LLaVA-Mini detaches every text embedding (encode_images_mini: all_text_embedding =
        # embed_tokens(ids).detach() feeds pre-fusion and is what the LLM reads at every unfused token, answers
        # included), so its training never updates the input embedding table: llm.train_input_embeddings=false.
        # With it on, the tokens the LLM reads raw train their rows, and prefusion.detach_text says whether
        # pre-fusion's input does too: training from scratch, the question words reach the LLM only fused and
        # learn only with detach_text=false.
        if not self.train_input_embeddings:
            text = text.detach()
        # Pre-fusion reads the instruction/system text only: never answers, padding or the <image> slot.
        fuse = attention_mask & ~is_image
        if labels is not None:
            fuse &= labels == IGNORE_INDEX
        if self.skip_token_id_0:  # official: input_ids * (labels == -100) <= 0 is masked, so id 0 too
            fuse &= input_ids != 0
        # Official training fuses a text-only sample with a blank image (its dataset gives training samples one);
        # its inference does not (no image, no fusion). Eval mode (validation loss, evaluation) is inference here.
        blank = self.text_only_blank_image and self.training if blank_text_only is None else blank_text_only
        media, fused, has_media = self.encode_media(batch, text.detach() if self.detach_prefusion_text else text, fuse, blank)
        if self.prefusion is not None:
            text = torch.where((fuse & has_media[:, None]).unsqueeze(-1), fused, text)

        seqs, seq_labels = [], []
        for b in range(B):
            keep = attention_mask[b]
            emb, ids = text[b][keep], input_ids[b][keep]
            lab = labels[b][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            if media[b] is not None:
                slot = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
                m = media[b].to(emb.dtype)
                emb = torch.cat([emb[:slot], m, emb[slot + 1 :]])
                lab = torch.cat([lab[:slot], lab.new_full((m.shape[0],), IGNORE_INDEX), lab[slot + 1 :]])
            seqs.append(emb)
            seq_labels.append(lab)
        return _pad(seqs, seq_labels, padding_side, labels is not None)

    # ------------------------------------------------------------------ forward / generate
    def forward(self, batch: Batch) -> CausalLMOutputWithPast:
        """Logits for the whole (expanded) sequence; ``loss`` when the batch has ``labels``."""
        embeds, mask, position_ids, labels = self.prepare_inputs(batch)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 16, **gen_kwargs: Any) -> torch.Tensor:
        """New token ids [B, n <= max_new_tokens]; greedy unless ``do_sample=True``; KV cache on.

        The prompt is left-padded and enters as embeddings, so the cache holds C² tokens per image.
        Extra keywords go to ``transformers`` ``generate`` (eos_token_id, temperature, ...).
        """
        embeds, mask, _, _ = self.prepare_inputs(batch, padding_side="left", blank_text_only=False)
        gen_kwargs.setdefault("do_sample", False)
        if gen_kwargs.get("pad_token_id") is None and self.llm.generation_config.pad_token_id is None:
            eos = self.llm.generation_config.eos_token_id
            gen_kwargs["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        # transformers' generate derives position ids from the left-padded mask (cumsum - 1)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask.long(), max_new_tokens=max_new_tokens, **gen_kwargs)


@contextlib.contextmanager
def _naming(key: str, what: str):
    """Re-raise a part's build error (bad kwargs, failed assertion) as a ValueError naming the config key."""
    try:
        yield
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{key} ({what}) cannot be built: {type(e).__name__}: {e}") from e


def _name(batch: Batch, b: int) -> str:
    ids = batch.get("sample_ids")
    return f"{b} ({ids[b]!r})" if ids is not None and ids[b] is not None else str(b)


def _pad(seqs: List[torch.Tensor], labels: List[torch.Tensor], side: str, with_labels: bool):
    """Stack variable-length [S_b, d] sequences: zeros embeddings, IGNORE labels, mask 0 on the padding."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got '{side}'")
    B, S, d = len(seqs), max(s.shape[0] for s in seqs), seqs[0].shape[-1]
    ref = seqs[0]
    embeds = ref.new_zeros(B, S, d)
    out_labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long, device=ref.device)
    mask = torch.zeros(B, S, dtype=torch.long, device=ref.device)
    position_ids = torch.zeros(B, S, dtype=torch.long, device=ref.device)
    for b, (emb, lab) in enumerate(zip(seqs, labels)):
        n = emb.shape[0]
        span = slice(0, n) if side == "right" else slice(S - n, S)
        embeds[b, span] = emb
        out_labels[b, span] = lab
        mask[b, span] = 1
        position_ids[b, span] = torch.arange(n, device=ref.device)
    return embeds, mask, position_ids, out_labels if with_labels else None
