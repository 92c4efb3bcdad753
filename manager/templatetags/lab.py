from django import template

register = template.Library()


@register.filter
def bs(field):
    """Render a form field's widget with Bootstrap classes (and the error state)."""
    existing = field.field.widget.attrs.get("class", "")
    cls = "form-select" if field.widget_type == "select" else "form-control"
    if field.errors:
        cls += " is-invalid"
    return field.as_widget(attrs={"class": f"{cls} {existing}".strip()})
