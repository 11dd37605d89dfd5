"""Integrations with other libraries (imported lazily: `import fused_attn` never imports them)."""
