package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject
import standin.ImageState

/**
 * STAND-IN for QuPath's PathObjectHierarchy (not QuPath): the 0.4+ methods the panel calls
 * ({@code addObjects}, {@code removeObjects}, {@code getAnnotationObjects},
 * {@code getDetectionObjects}, {@code getSelectionModel}, {@code fireHierarchyChangedEvent}),
 * over the objects of the stand-in image it was made for (as in QuPath, a hierarchy stays
 * with its image when another one is opened).
 */
class PathObjectHierarchy {
    final PathObjectSelectionModel selectionModel = new PathObjectSelectionModel()
    private final List<PathObject> objects

    PathObjectHierarchy(List<PathObject> objects) { this.objects = objects }

    boolean addObjects(Collection<? extends PathObject> pathObjects) {
        int before = objects.size()
        ImageState.get().addTo(objects, pathObjects)
        return objects.size() != before
    }

    void removeObjects(Collection<? extends PathObject> pathObjects, boolean keepChildren) {
        if (!pathObjects.isEmpty())
            ImageState.get().removeFrom(objects, pathObjects)
    }

    Collection<PathObject> getAnnotationObjects() {
        return new ArrayList<PathObject>(objects.findAll { it.isAnnotation() })
    }

    Collection<PathObject> getDetectionObjects() {
        return new ArrayList<PathObject>(objects.findAll { it.isDetection() })
    }

    PathObjectSelectionModel getSelectionModel() { return selectionModel }

    /** QuPath: tells the viewers that objects changed. The stand-in saves the record. */
    void fireHierarchyChangedEvent(Object source) { ImageState.get().save() }
}
