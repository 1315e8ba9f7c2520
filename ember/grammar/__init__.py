"""Grammar-constrained generation: JSON (optionally following a JSON schema) as an engine token constraint.

json_schema.py compiles a schema to value nodes, json_acceptor.py is the byte-level pushdown acceptor over
them, token_table.py holds each tokenizer's token bytes as tries, json_constraint.py computes the per-step masks.
"""
from ember.grammar.json_constraint import JSONConstraint, JSONGrammar, json_grammar

__all__ = ["JSONConstraint", "JSONGrammar", "json_grammar"]
