"""VibeVoice (Microsoft's next-token-diffusion TTS) through transformers' implementation:
checkpoint loading and conversion, the language model as cake stages, the frame loop."""
