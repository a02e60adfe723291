"""A corpus of JSON Schemas for structured-output tests: (name, user prompt, schema)."""

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

SCHEMAS = [
    ("person", "Describe a person as JSON with name and age.", PERSON),
    ("city", "Give a city as JSON.", {
        "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}),
    ("boolean_flag", "Is the sky blue? Answer as JSON.", {
        "type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
        "additionalProperties": False}),
    ("number", "What is pi? Answer as JSON.", {
        "type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"],
        "additionalProperties": False}),
    ("enum_color", "Pick a color as JSON.", {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
        "additionalProperties": False}),
    ("const", "Say ok as JSON.", {
        "type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"],
        "additionalProperties": False}),
    ("int_range", "Rate a movie from 1 to 5 as JSON.", {
        "type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["rating"], "additionalProperties": False}),
    ("number_range", "Give a temperature between -10.5 and 40 as JSON.", {
        "type": "object", "properties": {"celsius": {"type": "number", "minimum": -10.5, "maximum": 40}},
        "required": ["celsius"], "additionalProperties": False}),
    ("exclusive_range", "Give a probability as JSON.", {
        "type": "object", "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["p"], "additionalProperties": False}),
    ("string_len", "Give a short nickname as JSON.", {
        "type": "object", "properties": {"nick": {"type": "string", "minLength": 2, "maxLength": 8}},
        "required": ["nick"], "additionalProperties": False}),
    ("pattern_zip", "Give a US zip code as JSON.", {
        "type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"], "additionalProperties": False}),
    ("pattern_code", "Give a product code like AB-123 as JSON.", {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"], "additionalProperties": False}),
    ("string_array", "List three fruits as JSON.", {
        "type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
        "required": ["fruits"], "additionalProperties": False}),
    ("bounded_array", "List two to four numbers as JSON.", {
        "type": "object", "properties": {"nums": {"type": "array", "items": {"type": "integer"},
                                                  "minItems": 2, "maxItems": 4}},
        "required": ["nums"], "additionalProperties": False}),
    ("top_level_array", "List some colors as a JSON array.", {
        "type": "array", "items": {"type": "string"}, "maxItems": 5}),
    ("array_of_objects", "List two people as JSON.", {
        "type": "object", "properties": {"people": {"type": "array", "items": PERSON, "maxItems": 3}},
        "required": ["people"], "additionalProperties": False}),
    ("nested_address", "Describe a person with an address as JSON.", {
        "type": "object", "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["street", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}),
    ("deep_nesting", "Give a nested config as JSON.", {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
            "type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"],
            "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
        "required": ["a"], "additionalProperties": False}),
    ("optional_fields", "Describe a book as JSON.", {
        "type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                         "subtitle": {"type": "string"}},
        "required": ["title"], "additionalProperties": False}),
    ("all_optional", "Describe the weather as JSON.", {
        "type": "object", "properties": {"sunny": {"type": "boolean"}, "wind": {"type": "number"}},
        "additionalProperties": False}),
    ("nullable", "Give a middle name or null as JSON.", {
        "type": "object", "properties": {"middle": {"type": ["string", "null"]}}, "required": ["middle"],
        "additionalProperties": False}),
    ("any_of", "Give an id that is a number or a string, as JSON.", {
        "type": "object", "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
        "required": ["id"], "additionalProperties": False}),
    ("any_of_objects", "Describe a shape as JSON.", {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
             "required": ["kind", "side"], "additionalProperties": False}]}),
    ("defs_ref", "Give two points as JSON.", {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False}),
    ("recursive_tree", "Give a small tree as JSON.", {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["value"], "additionalProperties": False}},
        "$ref": "#/$defs/node"}),
    ("recursive_list", "Give a linked list as JSON.", {
        "$defs": {"cell": {"type": "object", "properties": {
            "head": {"type": "string"}, "tail": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}},
            "required": ["head", "tail"], "additionalProperties": False}},
        "$ref": "#/$defs/cell"}),
    ("enum_array", "Pick some weekdays as JSON.", {
        "type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]},
                                                  "maxItems": 3}},
        "required": ["days"], "additionalProperties": False}),
    ("mixed_types", "Describe a product as JSON.", {
        "type": "object", "properties": {
            "name": {"type": "string"}, "price": {"type": "number", "minimum": 0},
            "in_stock": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "price", "in_stock", "tags"], "additionalProperties": False}),
    ("integer_multiple", "Give an even number as JSON.", {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["n"], "additionalProperties": False}),
    ("date_pattern", "Give a date as JSON.", {
        "type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"], "additionalProperties": False}),
    ("free_object", "Give any JSON object describing a cat.", {"type": "object"}),
    ("additional_props", "Give a dictionary of word counts as JSON.", {
        "type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 4}),
    ("tuple_items", "Give a latitude/longitude pair as JSON.", {
        "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": False,
        "minItems": 2}),
    ("unicode_string", "Say hello in Japanese as JSON.", {
        "type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"],
        "additionalProperties": False}),
]
