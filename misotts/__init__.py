"""MisoTTS: fast runtime for RVQ text-to-dialogue speech models."""
