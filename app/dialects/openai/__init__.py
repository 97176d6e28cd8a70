"""OpenAI's API: its wire models (`wire`) and routes (`routes`)."""
