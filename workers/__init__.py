"""Model handlers on CTranslate2 (ASR, LLM, TTS, classify) and audio transforms; see issue 6."""
