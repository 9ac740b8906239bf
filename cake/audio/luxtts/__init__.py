"""LuxTTS: ZipVoice-Distill flow matching (Zipformer text encoder and decoder, Euler solver)
with LinaCodec's 48 kHz Vocos vocoder; zero-shot voice cloning from a reference clip."""
