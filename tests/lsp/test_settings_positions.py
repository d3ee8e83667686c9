from rotary.lsp.positions import UTF8, UTF16, offset_at, position_at
from rotary.lsp.settings import Settings, parse_settings


def test_settings_defaults_and_valid_values():
    s, warnings = parse_settings({"maxTokens": 32, "completionMode": "multiLine"})
    assert s.maxTokens == 32 and s.completionMode == "multiLine" and s.debounceMs == Settings().debounceMs
    assert warnings == []


def test_settings_accepts_the_section_wrapper():
    s, _ = parse_settings({"rotary": {"enabled": False}})
    assert s.enabled is False


def test_invalid_settings_warn_and_fall_back():
    s, warnings = parse_settings({"maxTokens": "lots", "debounceMs": -4, "completionMode": "sometimes", "colour": 1})
    assert s == Settings()
    assert len(warnings) == 4
    assert any("maxTokens" in w for w in warnings) and any("colour" in w for w in warnings)
    s, warnings = parse_settings(["not", "an", "object"])
    assert s == Settings() and warnings


def test_positions_in_utf16_utf8_and_code_points():
    text = "a🔧b\néx"
    assert offset_at(text, 0, 3, UTF16) == 2  # the emoji is 2 UTF-16 units
    assert offset_at(text, 0, 5, UTF8) == 2  # ...and 4 UTF-8 bytes
    assert offset_at(text, 1, 2, UTF8) == 5  # é is 2 bytes
    assert position_at(text, 2, UTF16) == (0, 3)
    assert position_at(text, 5, UTF8) == (1, 2)


def test_out_of_range_positions_clamp():
    text = "ab\ncd"
    assert offset_at(text, 0, 99) == 2  # past the end of the line: end of line
    assert offset_at(text, 7, 0) == len(text)  # past the last line: end of document
