"""Management planes written as files: the schema, loading with file/line/field errors,
rendering back, and the conversion between a plane document and the domain models."""
