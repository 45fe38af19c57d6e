"""Write a tiny random-weight Wan2.2 checkpoint in a real model's diffusers on-disk layout.

``like="t2v-a14b"`` (Wan2.2-T2V-A14B): model_index.json with ``boundary_ratio`` 0.875,
transformer/ (high-noise expert) and transformer_2/ (low-noise expert), the Wan2.1 VAE
(z_dim 16, 4x8x8 strides, transformer patch (1, 2, 2)). ``like="ti2v-5b"`` (Wan2.2-TI2V-5B):
one expert, ``expand_timesteps`` (a timestep per video token), the Wan2.2 VAE (z_dim 48,
residual blocks, pixels patchified 2x2 before the encoder: 4x16x16 strides). Both also hold
text_encoder/, tokenizer/ and scheduler/. Widths and depths are tiny (a few MB); component
classes and the fields that decide latent shapes are the real ones (issue #11, item 4). The
tokenizer is built here from a word list: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

BOUNDARY_RATIO = 0.875  # high-noise expert while t >= 875 of 1000 (Wan2.2 T2V-A14B)
TEXT_LEN = 64  # tokens per prompt for the tiny model (Wan2.2: 512)
LIKE = ("t2v-a14b", "ti2v-5b")  # the real layouts make_tiny_checkpoint copies

_WORDS = """a an the on in of with and is are moving left right up down still slowly quickly
red green blue yellow orange purple white black pink cyan gray brown circle square triangle
ball box shape background plain bouncing rotating growing shrinking cat dog city night day
sky sea forest camera shot close wide view light dark bright""".split()


def build_tokenizer(words: list[str] = _WORDS, max_length: int = TEXT_LEN) -> PreTrainedTokenizerFast:
    """Word-level, lower-cased tokenizer with UMT5's special tokens (<pad>=0, </s>=1, <unk>=2);
    English words split on white space, Chinese into single characters."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Lower-cases, and puts spaces around CJK characters: each Chinese character is a word.
    core.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                 strip_accents=False, lowercase=True)
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_transformer(channels: int = 16) -> WanTransformer3DModel:
    # Same class and patch (1,2,2) as A14B and 5B; 2 heads of 12 dims, 2 layers.
    # ``channels``: the VAE's z_dim (A14B 16, 5B 48).
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    # Norm weights start at one; random ones make a wrongly sharded norm show (issue #5).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
    return model


def tiny_vae(like: str) -> AutoencoderKLWan:
    if like == "t2v-a14b":
        # Wan2.1 VAE layout: stride 4x8x8, 16 latent channels.
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    # Wan2.2 VAE layout (TI2V-5B): 2x2 pixel patches (12 channels in and out), residual down
    # and up blocks, a wider decoder, 48 latent channels; strides 4x16x16 (8 x patch 2).
    g = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=(torch.randn(48, generator=g) * 0.5).tolist(),
        latents_std=(torch.rand(48, generator=g) + 0.5).tolist(),
    )


def make_tiny_checkpoint(path: str | Path, seed: int = 0, like: str = "t2v-a14b") -> Path:
    """Write the checkpoint to ``path`` (created) and return it. Same seed, same weights."""
    if like not in LIKE:
        raise ValueError(f"like must be one of {', '.join(LIKE)}; got {like!r}")
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = tiny_vae(like)
    if like == "t2v-a14b":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, num_train_timesteps=1000,
                                            flow_shift=3.0)
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                           scheduler=scheduler, transformer=tiny_transformer(),
                           transformer_2=tiny_transformer(), boundary_ratio=BOUNDARY_RATIO)
    else:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, num_train_timesteps=1000,
                                            flow_shift=5.0)  # TI2V-5B's shift
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                           scheduler=scheduler, transformer=tiny_transformer(48),
                           transformer_2=None, boundary_ratio=None, expand_timesteps=True)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
