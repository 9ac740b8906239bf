"""Speech models: VibeVoice through transformers (with voice cloning) and the bundled Piper
voice that works offline out of the box. The server talks to a SpeechService (service.py)."""
