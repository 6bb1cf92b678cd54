"""The offline CRD validator behaves like the API server on a create: a small CRD that uses each
feature the server treats specially, and objects it must admit or refuse."""

import pytest

from k8s_crd_schema import CRDRegistry

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            required: [size, mode]
            x-kubernetes-validations:
            - rule: self.size <= self.maxSize
              message: size must not exceed maxSize
            - rule: self.mode == oldSelf.mode
              message: mode is immutable
            properties:
              size: {type: integer, format: int32}
              maxSize: {type: integer, default: 10}
              mode: {type: string, enum: [fast, slow], default: fast}
              note: {type: string, nullable: true}
              port:
                x-kubernetes-int-or-string: true
                anyOf: [{type: integer}, {type: string}]
              extra:
                type: object
                x-kubernetes-preserve-unknown-fields: true
                properties:
                  known: {type: string}
              template:
                type: object
                x-kubernetes-embedded-resource: true
                properties:
                  spec: {type: object, properties: {replicas: {type: integer}}}
              ports:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [port, protocol]
                items:
                  type: object
                  required: [port]
                  properties:
                    port: {type: integer}
                    protocol: {type: string, default: TCP}
              tags:
                type: array
                x-kubernetes-list-type: set
                items: {type: string}
  - name: v1beta1
    served: false
    storage: false
    schema:
      openAPIV3Schema: {type: object}
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crds")
    (folder / "widgets.yaml").write_text(CRD)
    return CRDRegistry(folder)


def widget(**spec):
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3, **spec}}


def test_defaults_fill_required_fields_before_they_are_checked(registry):
    assert registry.validate(widget()) == []  # `mode` is required and has a default


def test_required_field_without_default_is_refused(registry):
    obj = widget()
    del obj["spec"]["size"]
    assert any("'size' is a required property" in e for e in registry.validate(obj))


def test_null_is_dropped_then_defaulted_unless_nullable(registry):
    assert registry.validate(widget(mode=None, note=None)) == []
    assert any("enum" in e or "is not one of" in e for e in registry.validate(widget(mode="warp")))


def test_unknown_fields_are_refused_at_any_depth(registry):
    assert registry.validate(widget(colour="red")) == ["spec.colour: unknown field"]
    assert registry.validate(widget(ports=[{"port": 1, "proto": "TCP"}])) == ["spec.ports[0].proto: unknown field"]


def test_preserve_unknown_fields_and_embedded_resources_are_respected(registry):
    obj = widget(extra={"known": "a", "anything": {"goes": 1}},
                 template={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"replicas": 1}})
    assert registry.validate(obj) == []
    assert registry.validate(widget(template={"spec": {"replica": 1}})) == ["spec.template.spec.replica: unknown field"]


def test_int_or_string_and_int32(registry):
    assert registry.validate(widget(port=80)) == registry.validate(widget(port="http")) == []
    assert registry.validate(widget(port=1.5)) != []
    assert any("maximum" in e for e in registry.validate(widget(size=2**31)))


def test_cel_rules_run_on_the_defaulted_object(registry):
    assert registry.validate(widget(size=10)) == []  # maxSize defaulted to 10
    assert registry.validate(widget(size=11)) == ["spec: size must not exceed maxSize"]
    # the transition rule (oldSelf) is not evaluated on a create
    assert not any("immutable" in e for e in registry.validate(widget(size=11)))


def test_list_map_keys_are_unique_after_defaulting(registry):
    assert registry.validate(widget(ports=[{"port": 1}, {"port": 1, "protocol": "UDP"}])) == []
    errors = registry.validate(widget(ports=[{"port": 1}, {"port": 1, "protocol": "TCP"}]))
    assert len(errors) == 1 and "duplicate entry" in errors[0]
    assert any("non-unique" in e for e in registry.validate(widget(tags=["a", "a"])))


def test_unserved_version_unknown_kind_and_bad_name_are_refused(registry):
    assert registry.validate({**widget(), "apiVersion": "example.com/v1beta1"}) == ["Widget example.com/v1beta1 is not served by its CRD"]
    assert registry.validate({**widget(), "kind": "Gadget"}) == ["no CRD defines Gadget in example.com/v1"]
    assert registry.validate({**widget(), "metadata": {"name": "Not_A_Name"}}) != []


def test_validation_does_not_change_the_object(registry):
    obj = widget(mode=None)
    registry.validate(obj)
    assert obj["spec"] == {"size": 3, "mode": None}


def test_missing_crd_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="kuberay-crds"):
        CRDRegistry(tmp_path / "absent")

