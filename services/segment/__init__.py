"""The segment service: contacts, consent, capabilities, contact events and saved segments."""
