"""Helpers shared by the offline agents; skipped by discovery (leading underscore)."""
